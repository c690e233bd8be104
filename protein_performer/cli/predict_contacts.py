"""``python -m protein_performer.predict_contacts checkpoint=<ckpt> head=<contact_head.json> input=<fasta>
output=<contacts.h5> [csv=<top.csv>] [png_dir=<dir>] [align_to=<sequence|fasta|none>] [dense_max=4096] [resume=true]``: contact probabilities for any
sequence, from a model's attention maps through the contact head that ``contacts`` fitted for the
same checkpoint (see :mod:`protein_performer.analysis.contacts.predict`). A rerun leaves the finished
output as it was until the new one replaces it; ``resume=true`` continues a killed run, and over a
finished output made with the same settings says so and does nothing."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from protein_performer.analysis.contacts.predict import DENSE_MAX, run_predict_contacts
from protein_performer.errors import cli_errors
from protein_performer.runtime import set_threads


def _align_to(value) -> str | bool | None:
    """``align_to=`` as the library takes it: Hydra reads null / true / false as YAML (kept); the words
    ``none`` / ``false`` and an empty value mean no reference (``False``); anything else is a sequence
    or a FASTA file."""
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip()
    return False if text.lower() in ("", "none", "false") else text


@hydra.main(config_path="../conf", config_name="predict_contacts", version_base="1.3")
@cli_errors
def main(cfg: DictConfig) -> dict:
    set_threads(cfg.get("num_threads"))
    summary = run_predict_contacts(
        checkpoint=str(cfg.checkpoint),
        head=str(cfg.head),
        input=str(cfg.input),
        output=str(cfg.output),
        csv_path=cfg.csv,
        png_dir=cfg.png_dir,
        top=float(cfg.top),
        crop=str(cfg.crop),
        min_residues=int(cfg.min_residues),
        invalid=str(cfg.invalid),
        resume=bool(cfg.resume),
        overwrite=bool(cfg.overwrite),
        device=str(cfg.device),
        progress=bool(cfg.progress),
        align_to=_align_to(cfg.get("align_to")),
        dense_max=None if (dm := cfg.get("dense_max", DENSE_MAX)) is None else int(dm),
    )
    if summary.already_complete:  # resume=true over a finished output: its log line said so
        return summary
    print(f"{summary.records} contact maps -> {summary.output}")
    for f in summary.input_failures:
        print(f"  left out: {f['reason']}")
    return summary


if __name__ == "__main__":
    main()
