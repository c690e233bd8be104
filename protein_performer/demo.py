"""``python -m protein_performer.demo``: the module path that users, scripts and docs run (a contract
that stays). The command is :func:`protein_performer.cli.demo.main` (``make demo`` runs it this way)."""

if __name__ == "__main__":
    from protein_performer.cli.demo import main

    main()
