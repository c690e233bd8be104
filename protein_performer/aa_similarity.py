"""``python -m protein_performer.aa_similarity`` and the console script: the entry point lives in
:mod:`protein_performer.cli.aa_similarity`; this module keeps the old import path working."""

from protein_performer.cli.aa_similarity import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
