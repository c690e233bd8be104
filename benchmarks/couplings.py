"""Score finished family-contacts runs by the coupling reading of their model (issue 21): the
recipe's score stage now reports it (``scores["couplings"]``, ``headline["couplings_long_P@L"]``;
:mod:`protein_performer.recipes.family_contacts.couplings`); this adds it to runs made before.

    python benchmarks/couplings.py <recipe output_dir> [...] [--record]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from protein_performer.pretrained import load_model  # noqa: E402
from protein_performer.recipes.family_contacts.couplings import score_couplings  # noqa: E402


def run_scores(run_dir: str | Path) -> dict:
    """``{"long_P@L", "long_P@L/5"}`` of a finished run's coupling map (its checkpoint, maps.h5, structure)."""
    import json

    run = Path(run_dir)
    structure = json.loads((run / "summary.json").read_text())["structure"]
    table = score_couplings(load_model(str(run / "checkpoints" / "last.ckpt")).model, run / "maps.h5", structure)
    return {"long_P@L": table["long"]["P@L"], "long_P@L/5": table["long"]["P@L/5"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="family-contacts recipe output folders")
    parser.add_argument(
        "--record", action="store_true", help="add the scores to those runs' rows of results/family_contacts.json"
    )
    args = parser.parse_args(argv)
    found = {}
    for run in args.runs:
        found[str(Path(run).resolve())] = s = run_scores(run)
        print(f"{run}: couplings long P@L {s['long_P@L']:.3f} (P@L/5 {s['long_P@L/5']:.3f})")
    if args.record:
        import family_contacts

        res = family_contacts.load_results()
        rows = [r for r in res["runs"] if str(Path(r["output_dir"]).resolve()) in found]
        for r in rows:
            r["couplings"] = found[str(Path(r["output_dir"]).resolve())]
        family_contacts.save_results(res)
        print(f"recorded in {len(rows)} rows of {family_contacts.JSON}")


if __name__ == "__main__":
    main()
