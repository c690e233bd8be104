"""`make demo` end to end, shortened: every stage through its real command line."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, repo_root):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "protein_performer.demo", f"output_dir={out}", "steps=40"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    # ingest: the embedded 4,000 records, the two held-out Pfam families in ood
    splits = summary["manifest"]
    assert set(splits) == {"train", "valid", "test", "ood"}
    assert sum(s["n_sequences"] for s in splits.values()) > 3900
    assert splits["ood"]["n_sequences"] > 100
    # train: metrics for every split next to the unigram baseline
    train = summary["train"]
    for split in ("valid", "test", "ood"):
        assert 0.0 < train[f"{split}/acc"] < 1.0
        assert train[f"{split}/unigram_ppl"] > 1.0
    assert list((out / "train" / "wandb").glob("offline-run-*"))
    # export + contacts + aa similarity
    assert (out / "maps.h5").stat().st_size > 0 and (out / "maps_random.h5").stat().st_size > 0
    assert {"trained", "random_init"} <= set(summary["contacts"])
    for mean in summary["contacts"].values():
        assert 0.0 <= mean["long"]["P@L"] <= 1.0
    assert summary["aa_similarity"]["all_heads"]["n_pairs"] == 190
    assert "protein_performer demo: summary" in proc.stdout
