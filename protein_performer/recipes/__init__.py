"""Recipes: whole pipelines built from the library's stages for one scientific question.

family_contacts   one Pfam family -> a family-level model -> its chain's contacts
                  (``python -m protein_performer.family_contacts``, ``pp-family-contacts``)
"""
