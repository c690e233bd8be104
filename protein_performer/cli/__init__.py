"""Thin Hydra entry points over the library, one module per command (the top of the layering:
``cli`` -> ``analysis`` / ``training`` / ``studies`` / ``recipes`` / ``data.ingest`` -> ``model``, ``data``).

Each module parses its config (``protein_performer/conf/<command>.yaml``), calls one library
function, prints a summary and turns a user error into ``error: <msg>`` and exit code 1
(:func:`protein_performer.errors.cli_errors`). The console scripts (``pp-<command>``) run these
mains directly; ``python -m protein_performer.<command>`` (a contract that stays) runs them through
``protein_performer/<command>.py``, which is only the ``__main__`` hook:

    ingest            FASTA(.gz) -> sharded HDF5              (protein_performer.data.ingest)
    train             train and evaluate a PerformerLM         (protein_performer.training.train)
    export_attention  attention maps / embeddings -> maps.h5   (protein_performer.analysis.export)
    contacts          contact precision against structures     (protein_performer.analysis.contacts)
    aa_similarity     amino-acid attention vs BLOSUM62         (protein_performer.analysis.aa_similarity)
    predict_contacts  contact maps for any sequence            (protein_performer.analysis.contacts.predict)
    embed             one mean embedding per sequence          (protein_performer.analysis.embed)
    demo              every stage above on the embedded sample (``make demo``)
    family_contacts   one Pfam family's model and its contacts (protein_performer.recipes.family_contacts;
                      not Hydra: key=value options, then Hydra overrides for training)
"""
