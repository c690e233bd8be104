"""``python -m protein_performer.train experiment=<name> [overrides]``: train and evaluate a PerformerLM.

Thin Hydra wrapper over :func:`protein_performer.training.train.train`; prints the final metrics.
A problem with the user's input is one line on stderr (``error: ...``) and exit code 1.
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from protein_performer.errors import cli_errors
from protein_performer.runtime import keep_freed_memory
from protein_performer.training.train import train


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@cli_errors  # bad input (data, checkpoint, settings), full disk, no permission: one line, exit 1
def main(cfg: DictConfig) -> float | None:
    keep_freed_memory()  # large CPU tensors reused instead of re-faulted (protein_performer.runtime)
    metrics = train(cfg)
    if rank_zero_only.rank == 0:
        summary = {k: v for k, v in metrics.items() if k.split("/")[-1] in ("acc", "ppl", "unigram_acc", "unigram_ppl")}
        print(json.dumps(summary, indent=2, sort_keys=True))
    return metrics.get(str(cfg.get("optimized_metric", "valid/loss")))


if __name__ == "__main__":
    main()
