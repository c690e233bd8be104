"""``python -m protein_performer.embed``: the module path that users, scripts and docs run (a contract
that stays). The command is :func:`protein_performer.cli.embed.main`; the console script runs it directly."""

if __name__ == "__main__":
    from protein_performer.cli.embed import main

    main()
