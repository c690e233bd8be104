"""Entry point: FASTA(.gz) -> sharded HDF5 (the work is done by :mod:`protein_performer.data.ingest`).

    python -m protein_performer.ingest input=data/uniprot_sample.fasta.gz output_dir=shards/sample
    python -m protein_performer.ingest input=big.fasta output_dir=out workers=8
    python -m protein_performer.ingest input=big.fasta output_dir=out resume=true     # after a crash

A huge uncompressed file across a SLURM array (Hydra multirun, conf/hydra/launcher/submitit_slurm.yaml),
then one merge that resolves duplicates over all parts and writes shards + manifest:

    python -m protein_performer.ingest -m hydra/launcher=submitit_slurm part='range(0,16)' num_parts=16 \\
        input=/data/uniprot_trembl.fasta output_dir=/data/trembl hydra.launcher.partition=cpu
    python -m protein_performer.ingest merge=true output_dir=/data/trembl workers=16

Options: conf/ingest.yaml. Paths are relative to the current directory (Hydra does not chdir).
Bad input (a file that is not FASTA, an output_dir that is a file or read-only, a full disk, ...):
``error: <file>: <what to do>`` on stderr, exit code 1, and no earlier output is touched.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from protein_performer.data.ingest import ingest
from protein_performer.errors import cli_errors

log = logging.getLogger("protein_performer.ingest")


def summary(manifest: dict) -> str:
    """A short text summary of a manifest (or of one part's result)."""
    if "splits" not in manifest:
        return (
            f"part {manifest['unit']} of {manifest['path']}: {manifest['n_records']} records, "
            f"{manifest['n_valid']} valid, rejected {manifest['rejected'] or 'none'}; run merge=true when all parts are done"
        )
    lines = [
        f"records {manifest['n_records']:,}  unique {manifest['n_unique']:,}  duplicates {manifest['n_duplicates']:,}"
        f"  rejected {sum(manifest['rejected'].values()):,} {manifest['rejected'] or ''}",
        f"{'split':<6} {'sequences':>11} {'residues':>14} {'min':>6} {'median':>8} {'mean':>8} {'max':>7} {'shards':>6}",
    ]
    for name, s in manifest["splits"].items():
        ln = s["length"]
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines.append(
            f"{name:<6} {s['n_sequences']:>11,} {s['n_residues']:>14,} {fmt(ln['min'], 'd'):>6} "
            f"{fmt(ln['median'], '.1f'):>8} {fmt(ln['mean'], '.1f'):>8} {fmt(ln['max'], 'd'):>7} {len(s['shards']):>6}"
        )
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="ingest", version_base="1.3")
@cli_errors  # IngestError, FastaFormatError, full disk, no permission: one line on stderr, exit 1
def _run(cfg: DictConfig) -> None:
    result = ingest(cfg)
    print(summary(result))


def main() -> None:
    _run()


if __name__ == "__main__":
    main()
