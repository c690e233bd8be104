"""``python -m protein_performer.export_attention``: the module path that users, scripts and docs run (a contract
that stays). The command is :func:`protein_performer.cli.export_attention.main`; the console script runs it directly."""

if __name__ == "__main__":
    from protein_performer.cli.export_attention import main

    main()
