"""``python -m protein_performer.demo`` and the console script: the entry point lives in
:mod:`protein_performer.cli.demo`; this module keeps the old import path working."""

from protein_performer.cli.demo import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
