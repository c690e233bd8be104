"""``python -m protein_performer.aa_similarity maps=<maps.h5> output_dir=<dir> [max_sequences=800]
[layers=[..]] [heads=[..]]``: attention aggregated over amino-acid pairs, correlated with BLOSUM62
(see :mod:`protein_performer.analysis.aa_similarity`); writes aa_similarity.json/.csv/.png."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from protein_performer.analysis.aa_similarity import run_aa_similarity
from protein_performer.errors import cli_errors


def _ints(v):
    if v is None:
        return None
    return [int(x) for x in v] if OmegaConf.is_list(v) else [int(v)]


@hydra.main(config_path="../conf", config_name="aa_similarity", version_base="1.3")
@cli_errors
def main(cfg: DictConfig) -> dict:
    result = run_aa_similarity(
        cfg.maps,
        cfg.output_dir,
        layers=_ints(cfg.layers),
        heads=_ints(cfg.heads),
        max_sequences=cfg.max_sequences,
        exclude_self=cfg.exclude_self,
        resume=bool(cfg.get("resume", False)),
    )
    allh, best = result["all_heads"], result["best_head"]
    print(
        f"{result['n_sequences']} sequences; all heads: Pearson {allh['pearson']:.3f}, "
        f"Spearman {allh['spearman']:.3f} with BLOSUM62 ({allh['n_pairs']} pairs)"
    )
    if best:
        print(f"best head: layer {best['layer']} head {best['head']}: Pearson {best['pearson']:.3f}")
    print(f"written to {cfg.output_dir}")
    return result


if __name__ == "__main__":
    main()
