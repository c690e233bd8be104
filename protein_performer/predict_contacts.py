"""``python -m protein_performer.predict_contacts`` and the console script: the entry point lives in
:mod:`protein_performer.cli.predict_contacts`; this module keeps the old import path working."""

from protein_performer.cli.predict_contacts import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
