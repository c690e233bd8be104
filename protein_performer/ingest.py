"""``python -m protein_performer.ingest`` and the console script: the entry point lives in
:mod:`protein_performer.cli.ingest`; this module keeps the old import path working."""

from protein_performer.cli.ingest import main, summary

__all__ = ["main", "summary"]

if __name__ == "__main__":
    main()
