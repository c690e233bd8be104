"""``python -m protein_performer.family_contacts``: the family-contacts recipe's command (module path
and console script ``pp-family-contacts``). The command is :func:`protein_performer.cli.family_contacts.main`."""

if __name__ == "__main__":
    from protein_performer.cli.family_contacts import main

    main()
