"""``python -m protein_performer.contacts``: the module path that users, scripts and docs run (a contract
that stays). The command is :func:`protein_performer.cli.contacts.main`; the console script runs it directly."""

if __name__ == "__main__":
    from protein_performer.cli.contacts import main

    main()
