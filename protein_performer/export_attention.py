"""``python -m protein_performer.export_attention`` and the console script: the entry point lives in
:mod:`protein_performer.cli.export_attention`; this module keeps the old import path working."""

from protein_performer.cli.export_attention import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
