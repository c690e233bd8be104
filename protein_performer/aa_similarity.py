"""``python -m protein_performer.aa_similarity``: the module path that users, scripts and docs run (a contract
that stays). The command is :func:`protein_performer.cli.aa_similarity.main`; the console script runs it directly."""

if __name__ == "__main__":
    from protein_performer.cli.aa_similarity import main

    main()
