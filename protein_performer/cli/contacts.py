"""``python -m protein_performer.contacts maps=<maps.h5> structures=<dir> output_dir=<dir>
[baseline_maps=<maps.h5>] [chains=[...]]``: contact precision of attention maps against
structures (see :mod:`protein_performer.analysis.contacts`); writes report.json, report.csv and
PNG plots into ``output_dir`` and prints the mean precision table."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from protein_performer.analysis.contacts import format_table, run_contacts
from protein_performer.errors import cli_errors


@hydra.main(config_path="../conf", config_name="contacts", version_base="1.3")
@cli_errors
def main(cfg: DictConfig) -> dict:
    chains = cfg.chains
    if chains is not None and not OmegaConf.is_list(chains):
        chains = [str(chains)]
    report = run_contacts(
        maps=cfg.maps,
        structures=cfg.structures,
        output_dir=cfg.output_dir,
        baseline_maps=cfg.baseline_maps,
        chains=list(chains) if chains is not None else None,
        min_residues=cfg.min_residues,
        threshold=cfg.threshold,
        min_identity=cfg.min_identity,
        max_mismatches=cfg.max_mismatches,
        n_folds=cfg.n_folds,
        train_size=cfg.train_size,
        C=cfg.C,
        solver=cfg.solver,
        seed=cfg.seed,
        n_plots=cfg.n_plots,
        standardize=cfg.get("standardize", True),
        save_head=cfg.get("save_head", True),
        head_train_size=cfg.get("head_train_size", 20),
        head_kind=str(cfg.get("head_kind", "logistic")),
        resume=bool(cfg.get("resume", False)),
    )
    print(f"{report['n_proteins']} proteins, {len(report['failures'])} failures; report in {cfg.output_dir}")
    print(format_table(report))
    for f in report["failures"]:
        print(f"  failed: {f['reason']}")
    return report


if __name__ == "__main__":
    main()
