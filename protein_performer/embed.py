"""``python -m protein_performer.embed`` and the console script: the entry point lives in
:mod:`protein_performer.cli.embed`; this module keeps the old import path working."""

from protein_performer.cli.embed import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
