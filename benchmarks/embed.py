"""Embedding-only export vs the model's bare forward pass, on the same batches.

    python benchmarks/embed.py [--input ../shared/data/swissprot2014_100k.fasta.gz] [--n 5000]

Rows, measured round-robin (one of each per round, so both see the same load phases):
- ``forward``: ``model(tokens, key_padding_mask)`` (with the LM head) over the batches that
  ``embed`` forms (sorted by length, ``--batch-tokens`` padded tokens each), tokens prepared in
  memory beforehand: no reading, no tokenizing, no writing;
- ``embed``: ``run_embed`` end to end: read the FASTA, tokenize, batch, embed, write the HDF5 file.

Both count the residues embedded; the ratio embed / forward is the floor of issue 12 (>= 0.8).
The model is the demo architecture (BID Performer-ReLU, 2 x 128), random-init (the speed does not
depend on the weights), max_len 1024 with ``crop=start``. Writes benchmarks/results/embed.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import Floor, day, newest, record, source, table, write  # noqa: E402

from protein_performer.analysis.embed import _batch_tokens, length_batches, run_embed  # noqa: E402
from protein_performer.analysis.export import crop_window  # noqa: E402
from protein_performer.data.fasta import read_fasta  # noqa: E402
from protein_performer.data.tokenizer import Tokenizer  # noqa: E402
from protein_performer.pretrained import load_model  # noqa: E402
from protein_performer.resources import shared_data  # noqa: E402

HEADING = "## Embedding-only export (issue 12): `benchmarks/embed.py`"


def section(rec: dict) -> str:
    """RESULTS.md's part for an ``embed`` record: residues and sequences per second of both rows, their ratio."""
    residues, sequences = rec["residues_per_s"], rec["sequences_per_s"]
    body = [
        ["forward only (tokens in memory)", f"{residues['forward']:.0f}", f"{sequences['forward']:.0f}"],
        [
            "embed, end to end (read, tokenize, embed, write HDF5)",
            f"{residues['embed']:.0f}",
            f"{sequences['embed']:.0f}",
        ],
        ["ratio embed / forward (median rounds)", f"{rec['embed_over_forward_throughput']:.2f}", ""],
    ]
    m = rec["model"]
    lines = [
        f"Command: `{rec['command']}`  ",
        f"Machine: {rec['machine']}; {day(rec['date'])}. {rec['sequences']:,} sequences ({rec['residues']:,} "
        f"residues) of `{Path(rec['input']).name}`, {m['attention']} {m['depth']} x {m['dim']}, "
        f"{rec['batch_tokens']} padded tokens per batch. Data: {source(rec)}",
        "",
    ]
    return "\n".join(lines + table(["row", "residues/s", "sequences/s"], body))


def floors(records: list[dict]) -> list[Floor]:
    """Issue 12: embedding-only export at least 0.8x the forward pass's throughput (latest record)."""
    rec = newest(records)
    ratio = rec["embed_over_forward_throughput"] if rec else None
    what = "embedding-only export / forward-only tokens/s (same batches)"
    return [Floor("12", what, 0.8, False, ratio, rec, "python benchmarks/embed.py")]


DEMO = {
    "attention": "favor_relu",
    "causal": False,
    "depth": 2,
    "dim": 128,
    "heads": 4,
    "dim_head": 32,
    "ff_dim": 256,
    "nb_features": 64,
    "dropout": 0.0,
    "max_len": 1024,
    "vocab_size": 29,
}


def first_records(path: Path, n: int, out: Path) -> int:
    """The first ``n`` valid records of ``path`` written as plain FASTA to ``out``; how many."""
    tok = Tokenizer()
    lines = []
    for rec in read_fasta(path):
        seq = rec.sequence.rstrip(b"*")
        try:
            tok.encode_bytes(seq)
        except ValueError:
            continue
        lines.append(b">" + rec.header.split()[0] + b"\n" + seq + b"\n")
        if len(lines) == n:
            break
    out.write_bytes(b"".join(lines))
    return len(lines)


def forward_batches(fasta: Path, batch_tokens: int, chunk: int) -> tuple[list, int]:
    """The padded batches ``embed`` runs (same chunks, crops and length sorting), in memory."""
    tok = Tokenizer()
    max_res = DEMO["max_len"] - tok.special_tokens(False)
    residues = []
    for rec in read_fasta(fasta):
        r = tok.encode_bytes(rec.sequence)
        a, b = crop_window(len(r), max_res, "start", "")
        residues.append(r[a:b])
    batches, n_res = [], 0
    for c0 in range(0, len(residues), chunk):
        part = residues[c0 : c0 + chunk]
        lengths = np.array([len(r) for r in part])
        for idx in length_batches(lengths, batch_tokens):
            batches.append(_batch_tokens([part[i] for i in idx], False, tok))
            n_res += int(lengths[idx].sum())
    return batches, n_res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=str(shared_data() / "swissprot2014_100k.fasta.gz"))
    ap.add_argument("--n", type=int, default=5000, help="first N sequences of the input")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "embed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    src = Path(args.input)
    if not src.is_file():
        sys.exit(f"input not found: {src} (the shared data folder is needed for this benchmark)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fasta = tmp / "input.fasta"
        n = first_records(src, args.n, fasta)
        lm = load_model("random", DEMO, seed=0)
        batches, n_res = forward_batches(fasta, args.batch_tokens, args.chunk)
        model = lm.model
        ckpt = tmp / "model.ckpt"
        torch.save(
            {
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": DEMO},
            },
            ckpt,
        )
        rows = {"forward": [], "embed": []}
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                for tokens, pad in batches:
                    model(tokens, pad if pad.any() else None)
            rows["forward"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s = run_embed(
                str(ckpt),
                str(fasta),
                str(tmp / f"emb{rep}.h5"),
                batch_tokens=args.batch_tokens,
                chunk=args.chunk,
                crop="start",
                progress=False,
            )
            rows["embed"].append(time.perf_counter() - t0)
            assert s.sequences == n
            print(f"round {rep + 1}: forward {rows['forward'][-1]:.2f} s, embed {rows['embed'][-1]:.2f} s", flush=True)
    med = {k: float(np.median(v)) for k, v in rows.items()}
    result = {
        "threads": torch.get_num_threads(),
        "input": str(src),
        "sequences": n,
        "residues": n_res,
        "batch_tokens": args.batch_tokens,
        "model": DEMO,
        "seconds": rows,
        "median_seconds": med,
        "residues_per_s": {k: n_res / v for k, v in med.items()},
        "sequences_per_s": {k: n / v for k, v in med.items()},
        "embed_over_forward_throughput": med["forward"] / med["embed"],
        "per_round_ratio": [f / e for f, e in zip(rows["forward"], rows["embed"])],
    }
    write(Path(args.out), record("embed", result))
    print(
        f"{n} sequences, {n_res} residues: forward {result['residues_per_s']['forward']:.0f} res/s, "
        f"embed {result['residues_per_s']['embed']:.0f} res/s ({result['sequences_per_s']['embed']:.1f} seq/s) "
        f"-> embed / forward = {result['embed_over_forward_throughput']:.2f} (floor 0.80)"
    )


if __name__ == "__main__":
    main()
