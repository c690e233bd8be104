"""FASTA(.gz) -> sharded HDF5: validation, deduplication, splits, parallel parts, merge, resume.

Pipeline (one code path for 1 worker, ``workers=N`` and SLURM ``part=i num_parts=n``), one file per step::

    config.py     options (conf/ingest.yaml) checked; the input cut into work units: whole files, or
                  byte ranges of one uncompressed file
    read.py       stage 1, per unit (in parallel): parse, validate, tokenize, hash; append the valid
                  records to raw files in <output_dir>/_work/unit-NNNN/ and the rejects to
                  rejects.tsv; checkpoint after every block (resume continues from there)
    resolve.py    (merge) the first valid record of an id fixes its sequence: a later record with
                  that id and another sequence is rejected (duplicate_id_conflict); among the rest,
                  the first record of each sequence (global order = file order) is kept, later ones
                  are duplicates. A sequence is ``ood`` when any of its records is in a held-out
                  family (annotations.py), else train/valid/test by a salted hash (hashing.py)
    write.py      stage 3, per unit (in parallel): the kept records' shards (atomic: temporary name,
                  then rename; existing shards are complete and skipped on resume)
    rejects.py    rejects.tsv, lines made absolute, id conflicts added, in input order
    manifest.py   manifest.json (atomic, last: it marks the ingest complete); then the raw work
                  files are removed
    pipeline.py   ingest() and merge(), which run the steps; workers.py: the process pool;
                  output.py: the output folder; common.py: file names, record dtype, split codes

The inputs' sha256 (for the manifest) is computed by a worker process right after its stage-1
unit (a thread after stage 1 with one worker): it fills the time that worker would wait for the
main process's unit and the serial resolve step, instead of taking CPU from stage 1. With the
default ``gzip_strategy=huffman_only`` the token chunks are deflated with zlib's Huffman-only
strategy and stored as they are (``write_direct_chunk``): standard gzip-filtered HDF5, ~1.7x
faster than HDF5's level-1 filter and smaller (see shard_writer.py).

Where the time goes (1 worker, 100k Swiss-Prot records, 36 M residues, ~0.8 s; benchmarks/ingest.py):
stage 1 ~45% (regex record split + translate, one BLAKE2b per sequence, raw files), Huffman
deflate of the tokens ~35%, the rest of stage 3 (ids, HDF5) ~10%, resolve ~3%. With ``workers=2``
the serial part (start-up, resolve, manifest) is ~5% of the 1-worker time.

Dedup and splits depend only on the records and their global order, never on how the input was
cut, so ``workers=N`` and part/merge give the same sequences, ids and splits as one worker (shard
boundaries and file names differ: ``shard-NNNNN.h5`` for one unit, ``part-NNNN-shard-NNNNN.h5``
otherwise; the manifest lists them in global order).

Memory: stage 1 holds one block (1 MiB by default) and the set of OOD accessions; the resolve step
sorts 48 bytes per record in buckets of at most ``merge_memory_mb`` and keeps 1 byte per record
(its final split); stage 3 reads the records in windows and holds one shard: about
``merge_memory_mb`` + 1 byte per record (250 MB for all of TrEMBL) + one shard. Disk: the raw work
files take about the size of the tokens plus 60 bytes per record until the merge finishes.

SLURM: ``python -m protein_performer.ingest -m hydra/launcher=submitit_slurm part='range(0,16)'
num_parts=16 input=/data/uniprot_trembl.fasta output_dir=/data/trembl_shards`` runs the 16 stage-1
parts as an array job; then ``python -m protein_performer.ingest merge=true
output_dir=/data/trembl_shards workers=16`` resolves and writes the shards and the manifest.
"""

from __future__ import annotations

from protein_performer.data.fasta import FastaFormatError

from .annotations import load_ood_accessions
from .common import (
    CONFIG_NAME,
    FORMAT_VERSION,
    HASH_SPLITS,
    MANIFEST_NAME,
    OOD_CODE,
    REC,
    REJECT_REASONS,
    REJECTS_NAME,
    SLURM_LOG_DIR,
    WORK_DIR,
    IngestError,
    SimulatedInterruption,
)
from .config import FINGERPRINT_KEYS, PAPER_OOD_FAMILIES, IngestConfig, default_config, plan_units, resolve_config
from .hashing import split_codes
from .pipeline import ingest, merge
from .read import BAD, STAR, parse_header, run_unit, token_table
from .write import write_unit_shards

# the public names of the single-module version (its __all__ held the first line's)
__all__ = [
    "FastaFormatError", "IngestConfig", "IngestError", "PAPER_OOD_FAMILIES", "SimulatedInterruption", "ingest", "load_ood_accessions", "merge",
    "parse_header", "plan_units", "resolve_config", "split_codes",
    "BAD", "CONFIG_NAME", "FINGERPRINT_KEYS", "FORMAT_VERSION", "HASH_SPLITS", "MANIFEST_NAME", "OOD_CODE", "REC",
    "REJECTS_NAME", "REJECT_REASONS", "SLURM_LOG_DIR", "STAR", "WORK_DIR", "default_config", "run_unit", "token_table",
    "write_unit_shards",
]  # fmt: skip
