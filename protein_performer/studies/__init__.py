"""Studies that reproduce the Performer paper's claims at workstation scale (issue 6).

Each study is one command that writes JSON + PNG into ``--out-dir`` (default ``./study_results``
under the current directory, never the package) and its markdown section into ``--markdown``
(default ``<out-dir>/studies.md``); ``make studies`` passes ``--out-dir benchmarks/results/studies
--markdown study_results/studies.md`` and then regenerates ``benchmarks/results/studies.md`` from the JSON:

    python -m protein_performer.studies.approximation   # 1. MSE vs number of features m
    python -m protein_performer.studies.speed           # 2. time / memory vs length L
    python -m protein_performer.studies.compatibility   # 3. exact -> FAVOR+ weight swap, fine-tune
    python -m protein_performer.studies.redraw          # 4. fixed vs redrawn random features
    python -m protein_performer.studies.causal_generation  # 5. recurrent causal generation

Defaults finish in under 15 minutes on 2 CPU cores (2 to 5 minutes each on a quiet machine);
``--device cuda`` and the size arguments scale them up. The library piece behind study 5 is
``protein_performer.generation`` (token-by-token sampling with the recurrent FAVOR+ state).
Shared pieces live in ``sequences`` (data), ``small_training`` (the loop ``fit_small_model``,
evaluation), ``pretrained`` (cached trained models), ``reports`` (machine, JSON, markdown, figures)
and ``study_cli`` (the common command-line options); the studies import those modules by name.
"""
