"""``python -m protein_performer.embed checkpoint=<ckpt> input=<fasta> output=<embeddings.h5>
[batch_tokens=16384] [crop=error|skip|start|center] [resume=true]``: one mean embedding per sequence,
no attention maps, batched by length (see :mod:`protein_performer.analysis.embed`). A rerun leaves
the finished output as it was until the new one replaces it; ``resume=true`` continues a killed run,
and over a finished output made with the same settings says so and does nothing."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from protein_performer.analysis.embed import run_embed
from protein_performer.errors import cli_errors
from protein_performer.runtime import set_threads


@hydra.main(config_path="../conf", config_name="embed", version_base="1.3")
@cli_errors
def main(cfg: DictConfig) -> dict:
    set_threads(cfg.get("num_threads"))
    summary = run_embed(
        checkpoint=str(cfg.checkpoint),
        input=str(cfg.input),
        output=str(cfg.output),
        batch_tokens=int(cfg.batch_tokens),
        chunk=int(cfg.chunk),
        crop=str(cfg.crop),
        min_residues=int(cfg.min_residues),
        invalid=str(cfg.invalid),
        resume=bool(cfg.resume),
        overwrite=bool(cfg.overwrite),
        device=str(cfg.device),
        progress=bool(cfg.progress),
        model_config=cfg.model_config,
        seed=int(cfg.seed),
    )
    if summary.already_complete:  # resume=true over a finished output: its log line said so
        return summary
    print(
        f"{summary.sequences} embeddings ({summary.new} new) -> {summary.output} in "
        f"{summary.seconds:.1f} s ({summary.sequences_per_s:.1f} sequences/s)"
    )
    for f in summary.input_failures[:20]:
        print(f"  left out: {f['reason']}")
    return summary


if __name__ == "__main__":
    main()
