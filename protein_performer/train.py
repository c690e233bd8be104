"""``python -m protein_performer.train`` and the console script: the entry point lives in
:mod:`protein_performer.cli.train`; this module keeps the old import path working."""

from protein_performer.cli.train import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
