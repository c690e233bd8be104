"""``python -m protein_performer.export_attention checkpoint=<ckpt|random> input=<fasta|structure dir>
output=<maps.h5> [include=[attentions,apc,mean,per_token,apc_mean,contacts]] [layers=[..]] [heads=[..]]
[reduce=layer|all] [top=1.0] [min_sep=6] [tile=256] [crop=error|skip|start|center]
[max_sequences=N] [model_config=<ckpt|yaml>] [seed=0] [resume=true] [overwrite=true]``: the
attention maps (and embeddings) of a model, written to one HDF5 file (see
:mod:`protein_performer.analysis.export`). A killed export leaves ``<output>.partial`` (+ journal);
``resume=true`` continues it (same file as an uninterrupted run), ``overwrite=true`` starts again.
A rerun leaves the finished output as it was until the new one replaces it; ``resume=true`` over a
finished output made with the same settings says so and does nothing (other settings: refused).
Bad input: ``error: <file>: <what to do>`` on stderr, exit code 1."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from protein_performer.analysis.export import run_export
from protein_performer.analysis.export.tiles import TILED
from protein_performer.errors import cli_errors
from protein_performer.runtime import keep_freed_memory, set_threads


def _selection(cfg: DictConfig) -> dict:
    """The map selection options of the config (layers, heads: a list, one number or null)."""
    sel = {}
    for key in ("layers", "heads"):
        v = cfg.get(key)
        sel[key] = None if v is None else (list(v) if OmegaConf.is_list(v) else [int(v)])
    for key in ("reduce", "top", "min_sep", "tile"):
        if cfg.get(key) is not None:
            sel[key] = cfg[key]
    return sel


@hydra.main(config_path="../conf", config_name="export_attention", version_base="1.3")
@cli_errors
def main(cfg: DictConfig) -> dict:
    set_threads(cfg.get("num_threads"))
    include = cfg.include
    include = list(include) if OmegaConf.is_list(include) else [str(include)]
    if not set(TILED).intersection(include):
        # large CPU tensors reused instead of re-faulted (protein_performer.runtime); not for the tiled
        # outputs of long sequences: a heap never given back keeps every tile size's peak (2.9 GB instead
        # of 1.5 GB at L 16,384)
        keep_freed_memory()
    model_config = cfg.model_config
    if OmegaConf.is_config(model_config):
        model_config = OmegaConf.to_container(model_config, resolve=True)
    summary = run_export(
        checkpoint=str(cfg.checkpoint),
        input=str(cfg.input),
        output=str(cfg.output),
        include=include,
        model_config=model_config,
        seed=int(cfg.seed),
        crop=cfg.crop,
        max_sequences=cfg.max_sequences,
        min_residues=int(cfg.min_residues),
        invalid=cfg.invalid,
        device=cfg.device,
        progress=bool(cfg.progress),
        resume=bool(cfg.get("resume", False)),
        overwrite=bool(cfg.get("overwrite", False)),
        selection=_selection(cfg),
    )
    if summary.already_complete:  # resume=true over a finished output: its log line said so
        return summary
    print(
        f"{summary.records} sequences ({summary.residues} residues; {summary.cropped} cropped, "
        f"{summary.skipped_too_long} skipped as too long) -> {summary.output} "
        f"[{summary.layers} layers x {summary.heads} heads, {', '.join(summary.include)}] "
        f"in {summary.seconds:.1f} s"
        + (f" ({summary.resumed_records} kept from the interrupted export)" if summary.resumed_records else "")
    )
    for f in summary.input_failures:
        print(f"  left out: {f['reason']}")
    return summary


if __name__ == "__main__":
    main()
