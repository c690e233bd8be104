"""The family-contacts recipe: a family-level model whose attention maps carry contacts (issue 12, item 3).

    python -m protein_performer.family_contacts family=PF00072 output_dir=<OUT>
        [input=<pfam40_domains.fasta.gz>] [structures=<kortemme40 dir>] [max_identity=0.9]
        [max_sequences=N] [stages=extract,ingest,train,export,score,contacts]
        [resume=true | overwrite=true] [<hydra override> ...]

1. extract: the family's domains from the pfam40 FASTA (header ``>NAME/start-end PFxxxxx``) into
   ``<OUT>/family.fasta``, leaving out every domain at least ``max_identity`` identical to the
   family's kortemme40 chain (the test protein; see :func:`.extract.holdout_similar`);
2. ingest into ``<OUT>/shards`` (train/valid/test by sequence hash);
3. train ``experiment=family_contacts`` (Hydra overrides after the options: ``data=<group>``,
   ``model=<group>``, ``model.dim=...``), run folder
   ``<OUT>``: the checkpoint is ``<OUT>/checkpoints/last.ckpt``;
4. export the maps of the family's chain for the trained model and a random-init twin;
5. score the unsupervised mean-of-heads APC map (no fitted weights) and each layer's mean, by
   range (short 6-11, medium 12-23, long >= 24) and P@L, P@L/2, P@L/5; write
   ``<OUT>/summary.json`` and ``<OUT>/contacts.png`` (predicted vs true contacts);
6. contacts: the maps of every chain of ``structures`` (trained and random init) in
   ``<OUT>/kortemme40/``, the ``contacts`` step on them with 20 training chains (report, and the
   contact head for ``predict_contacts`` in ``<OUT>/kortemme40/contacts/contact_head.json``), and the
   head fitted leave-family-out: on chains of other families only, scored on the family's chain
   (see :mod:`.head`).

With ``probe_every_s`` the :class:`.scoring.ContactProbe` callback also scores the chain during training
(the same map from the in-memory model), which gives precision against training minutes.

``<OUT>/summary.json`` records the stages done (rewritten after each one). A rerun over stages
already done is refused; ``resume=true`` says a complete output is complete (exit 0, nothing
changed) or runs the stages not done; ``overwrite=true`` reruns into a staging folder beside
``<OUT>`` that replaces it only when complete (see :mod:`.rerun`).

The modules, in the order the stages use them: ``extract`` (the family's rows, raw or aligned to
the chain, and the hold-out of near copies of the chain), ``data`` (the span-masking
``FamilyDataModule`` of ``conf/data/family.yaml``), ``scoring`` (the unsupervised scores, the
probe, the plot), ``head`` (the fitted contact head), ``rerun`` (resume / overwrite) and ``run``
(the pipeline, :func:`.run.run`). The command is :mod:`protein_performer.cli.family_contacts`.

The user's own family (an A3M, Stockholm or FASTA file and a query instead of ``family=``) runs the
stages prepare, ingest, train, contacts of :mod:`.tool` (:func:`.tool.run_tool`), reading the
alignment with :mod:`.msa` and weighting the training sampler (:mod:`.data`).
"""
