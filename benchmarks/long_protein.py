"""A long protein on a workstation (issue 20): the mean embedding, the top-L contacts and a PNG of
one layer's head-mean APC map of a 35,000-residue protein, from a random-init long-context model,
on the CPU. ``make long-protein`` runs it (LENGTH=35000 LONG_OUT=long_protein_out).

    python benchmarks/long_protein.py [--length 35000 | --longest] [--layer 5] [--out long_protein_out]

- the protein: the records of ``$PP_SHARED_DATA/swissprot2014_100k.fasta.gz`` (else the repo's
  Swiss-Prot sample) joined until ``--length`` residues (``--longest``: the longest record of the
  shared FASTA files instead);
- the model: the ``trembl_concat_8192`` shape (6 layers, d 512, 8 heads, m 256, Performer-ReLU,
  causal) with rotary positions, so the protein runs whole; random init (seed 0);
- one command: ``export_attention checkpoint=random include=[mean,apc_mean,contacts] layers=[..] reduce=all``
  (every map in row tiles from the layer's features: memory linear in L), in a subprocess whose
  time and peak RSS are recorded;
- from its maps.h5: ``mean_embedding.npy``, ``top_contacts.csv`` (the top-L pairs, j - i >= 6, of
  the layer's head-mean APC map, streamed by rows), ``apc_mean.png`` (the map max-pooled to at most
  1000 x 1000 pixels, read by rows) and ``summary.json``; the same numbers as a benchmark record,
  ``benchmarks/results/long_protein.json`` (``--record``; RESULTS.md shows it).

Disk: the head-mean map is stored in float16, 2 L^2 bytes (2.4 GB at L = 35,000).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import RESULTS, Floor, day, record, source, write  # noqa: E402

from protein_performer.analysis.maps.tiles import TopPairs  # noqa: E402
from protein_performer.data.fasta import read_fasta  # noqa: E402
from protein_performer.resources import shared_data  # noqa: E402

MODEL = {
    "max_len": 8192, "depth": 6, "heads": 8, "dim": 512, "dim_head": 64, "ff_dim": 1024, "nb_features": 256,
    "attention": "favor_relu", "causal": True, "positions": "rotary", "dropout": 0.0,
}  # fmt: skip
STANDARD = set(b"ACDEFGHIKLMNPQRSTVWY")
HEADING = "## A long protein on the CPU (issue 20): `make long-protein` (`benchmarks/long_protein.py`)"


def section(rec: dict) -> str:
    """RESULTS.md's part for a ``long_protein`` record: the protein, the export's time, peak RSS and file size."""
    m = rec["model"]
    return "\n".join(
        [
            f"Command: `{rec['command']}`; "
            f"Machine: {rec['machine']}; {day(rec['date'])}, {rec['threads']} threads. Data: {source(rec)}",
            "",
            f"- `{rec['id']}`, L = {rec['length']:,}, {m['attention']} {m['depth']} x {m['dim']} ({m['positions']} "
            f"positions, random init): `export_attention include=[mean,apc_mean,contacts] layers=[{rec['layer']}] reduce=all` "
            f"in {rec['seconds'] / 60:.1f} min, peak RSS {rec['peak_rss_mb'] / 1024:.2f} GB, maps.h5 "
            f"{rec['maps_h5_bytes'] / 1e9:.2f} GB (the head-mean map in float16: 2 L^2 bytes).",
        ]
    )


def floors(records: list[dict]) -> list[Floor]:
    """None: issue 20 asks the example to run on a workstation and names no number for it (the
    35,000-residue predict_contacts floors are benchmarks/analysis_scale.py's)."""
    return []


def fasta_sources() -> list[Path]:
    shared = shared_data()
    found = [shared / name for name in ("swissprot2014_100k.fasta.gz", "uniprot_20k.fasta.gz")] if shared else []
    return [p for p in found if p.is_file()] or [REPO / "data" / "swissprot_sample.fasta.gz"]


def protein(length: int | None) -> tuple[str, str]:
    """``(id, sequence)``: records joined up to ``length`` residues, or the longest record (None)."""
    if length is None:
        best = max((r for p in fasta_sources() for r in read_fasta(p)), key=lambda r: len(r.sequence))
        seq = bytes(c for c in best.sequence if c in STANDARD).decode()
        return best.id.split()[0], seq
    parts, n = [], 0
    for rec in (r for p in fasta_sources() for r in read_fasta(p)):
        seq = bytes(c for c in rec.sequence if c in STANDARD)
        parts.append(seq)
        n += len(seq)
        if n >= length:
            return f"concat_{length}", b"".join(parts)[:length].decode()
    raise SystemExit(f"the FASTA files {fasta_sources()} hold only {n} residues, fewer than {length}")


def run_export(out: Path, layer: int, threads: int) -> dict:
    """The export command in a subprocess: seconds and its own peak RSS (os.wait4)."""
    cmd = [sys.executable, "-m", "protein_performer.export_attention", "checkpoint=random"]
    cmd += [f"model_config={out / 'model.yaml'}", f"input={out / 'protein.fasta'}", f"output={out / 'maps.h5'}"]
    # reduce=all of one layer is its head mean; it takes the pairs-i<=j tiles and sums on disk above L 8192
    cmd += ["include=[mean,apc_mean,contacts]", f"layers=[{layer}]", "reduce=all", "top=1.0", "min_residues=1"]
    cmd += ["progress=false", f"num_threads={threads}", "overwrite=true"]
    print(" ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(REPO)})
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"export failed (exit {os.waitstatus_to_exitcode(status)})")
    return {
        "export_command": " ".join(cmd[1:]),
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def top_contacts(ds: h5py.Dataset, k: int, min_sep: int = 6, rows: int = 512):
    """The top k pairs of the (L, L) map ``ds`` read ``rows`` rows at a time."""
    top = TopPairs(k, min_sep)
    for i0 in range(0, ds.shape[0], rows):
        top.add(i0, torch.as_tensor(ds[i0 : i0 + rows].astype(np.float32)))
    return top.result()


def pooled(ds: h5py.Dataset, pixels: int = 1000) -> np.ndarray:
    """The map max-pooled to at most ``pixels`` x ``pixels``, read by blocks of rows."""
    L = ds.shape[0]
    f = -(-L // pixels)  # pool factor
    n = -(-L // f)
    out = np.full((n, n), -np.inf, dtype=np.float32)
    for b in range(n):
        block = ds[b * f : (b + 1) * f].astype(np.float32)
        pad = n * f - L
        block = np.pad(block, ((0, 0), (0, pad)), constant_values=-np.inf)
        out[b] = block.reshape(len(block), n, f).max(axis=(0, 2))
    return out


def plot(img: np.ndarray, pairs, L: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    vmax = np.quantile(img, 0.999)
    ax.imshow(img, cmap="Blues", vmin=0, vmax=vmax, extent=(0, L, L, 0), interpolation="nearest")
    i, j, _ = pairs
    ax.scatter(i, j, s=1, c="tab:red", label=f"top-L pairs (lower triangle, {len(i)})")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("residue")
    ax.set_ylabel("residue")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=35000)
    ap.add_argument("--longest", action="store_true", help="the longest record of the shared data instead")
    ap.add_argument("--layer", type=int, default=MODEL["depth"] - 1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="long_protein_out")
    ap.add_argument("--record", default=str(RESULTS / "long_protein.json"), help="the benchmark record ('' for none)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rid, seq = protein(None if args.longest else args.length)
    (out / "protein.fasta").write_text(f">{rid}\n{seq}\n")
    (out / "model.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in MODEL.items()))
    print(f"{rid}: {len(seq)} residues; model {MODEL}", flush=True)
    run = run_export(out, args.layer, args.threads)
    with h5py.File(out / "maps.h5") as h5:
        g = h5[next(iter(h5))]
        np.save(out / "mean_embedding.npy", g["embeddings/mean"][()])
        L = len(seq)
        view = _Layer(g["apc_mean"])
        pairs = top_contacts(view, L)
        img = pooled(view)
    with open(out / "top_contacts.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["i", "j", "apc_mean"])
        w.writerows((int(i) + 1, int(j) + 1, f"{v:.6g}") for i, j, v in zip(*pairs))
    plot(img, pairs, L, out / "apc_mean.png", f"{rid} (L = {L}), layer {args.layer}: head-mean APC, random init")
    summary = {"id": rid, "length": L, "layer": args.layer, "model": MODEL, **run}
    summary["maps_h5_bytes"] = (out / "maps.h5").stat().st_size
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if args.record:
        write(Path(args.record), record("long_protein", {**summary, "threads": args.threads}))
    print(json.dumps({k: v for k, v in summary.items() if k != "model"}, indent=1))


class _Layer:
    """Layer 0 of an (n, L, L) dataset as an (L, L) array read by row slices."""

    def __init__(self, ds: h5py.Dataset):
        self.ds, self.shape = ds, ds.shape[1:]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.ds[0, rows]


if __name__ == "__main__":
    main()
