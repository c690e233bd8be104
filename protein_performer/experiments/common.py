"""The pieces the studies share, re-exported from the modules that hold them (the old import path):

    sequences        real sequences as token ids, seeded splits, batches       (SAMPLE, load_split, ...)
    small_training   TrainConfig, build_model, evaluate, fit_small_model (alias ``train``)
    pretrained       pretrained / exact_reference (trained once, cached), capture_qkv
    reports          machine_info, timings, JSON / markdown / figures written atomically
    study_cli        each study's command: options, start, write_study

Studies write to their ``--out-dir`` (default ``./study_results``), never into the package.
"""

from protein_performer.experiments.pretrained import (
    DEFAULT_CACHE,
    EXACT_SHAPE,
    capture_qkv,
    exact_reference,
    pretrained,
)
from protein_performer.experiments.reports import (
    best_time,
    default_out_dir,
    machine_info,
    machine_line,
    md_table,
    pyplot,
    save_figure,
    timer,
    update_markdown,
    write_json,
)
from protein_performer.experiments.sequences import (
    SAMPLE,
    eval_batches,
    load_sequences,
    load_split,
    split_sequences,
    to_device,
    train_batch,
)
from protein_performer.experiments.small_training import TrainConfig, build_model, evaluate, fit_small_model, train
from protein_performer.experiments.study_cli import (
    add_device_args,
    add_output_args,
    command_line,
    parse_study_args,
    setup_logging,
    start_study,
    study_args,
    study_command,
    study_parser,
    study_record,
    write_study,
)

__all__ = [
    "DEFAULT_CACHE",
    "EXACT_SHAPE",
    "SAMPLE",
    "TrainConfig",
    "add_device_args",
    "add_output_args",
    "best_time",
    "build_model",
    "capture_qkv",
    "command_line",
    "default_out_dir",
    "eval_batches",
    "evaluate",
    "exact_reference",
    "fit_small_model",
    "load_sequences",
    "load_split",
    "machine_info",
    "machine_line",
    "md_table",
    "parse_study_args",
    "pretrained",
    "pyplot",
    "save_figure",
    "setup_logging",
    "split_sequences",
    "start_study",
    "study_args",
    "study_command",
    "study_parser",
    "study_record",
    "timer",
    "to_device",
    "train",
    "train_batch",
    "update_markdown",
    "write_json",
    "write_study",
]
