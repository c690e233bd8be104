# protein_performer: two commands, `make demo` and `make test`. Both build .venv when missing.
#
# TORCH_SPEC picks the PyTorch build that is installed first. The default is the CPU wheel that
# the project is tested with; CUDA users override it, e.g.
#   make demo TORCH_SPEC='torch==2.5.1' TORCH_INDEX='--index-url https://download.pytorch.org/whl/cu124'
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
# Triton runs the CUDA kernels' tests on the CPU (TRITON_INTERPRET=1). CUDA builds of torch bring
# their own triton, which is kept; the CPU build has none, so this one is installed.
TRITON_SPEC ?= triton>=3.9,<3.10
# flash-linear-attention (FavorAttention(impl="fla"), causal): pure Python on top of triton; its tests
# run under the interpreter. --no-deps: it must not replace the torch/triton chosen above.
FLA_SPEC    ?= fla-core>=0.6,<0.7
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
DEMO_DIR    ?= demo_out
PYTEST_ARGS ?=
FAMILY      ?= PF00072
OUT         ?= family_contacts_out/$(FAMILY)
# the larger real data sets (pfam40, kortemme40): $PP_SHARED_DATA when set, else ../shared/data, as in
# protein_performer/resources.py (shared_data)
SHARED_DATA ?= $(or $(PP_SHARED_DATA),../shared/data)

.PHONY: all venv demo test test-fast lint results bench studies notebooks family-contacts long-protein clean help

all: help

help:
	@echo "make demo   - set up .venv and run ingest -> train -> export -> contacts on data/"
	@echo "make test   - set up .venv and run the whole test suite (slow tests included)"
	@echo "make lint   - ruff check + ruff format --check (CI runs it before the tests)"
	@echo "make bench  - run the benchmarks (see benchmarks/RESULTS.md)"
	@echo "make results - regenerate benchmarks/RESULTS.md from benchmarks/results/*.json"
	@echo "make studies - rerun the paper-claim studies (protein_performer/studies)"
	@echo "make notebooks - rerun the notebooks on the recipe's (else the demo's) outputs and store them with outputs"
	@echo "make family-contacts FAMILY=PF00072 OUT=<dir> - train on one Pfam family (SHARED_DATA: \$$PP_SHARED_DATA, else ../shared/data), export, score contacts"
	@echo "    over a finished OUT: ARGS=resume=true (complete: nothing to do) or ARGS=overwrite=true (rerun, replace when done)"
	@echo "make long-protein LENGTH=35000 LONG_OUT=<dir> - a 35,000-residue protein through a random-init long-context model on the CPU:"
	@echo "    mean embedding, top-L contacts, a PNG of one layer's head-mean APC map (benchmarks/long_protein.py)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c 'import triton' 2>/dev/null || $(PY) -m pip install --quiet '$(TRITON_SPEC)'
	$(PY) -c 'import fla' 2>/dev/null || $(PY) -m pip install --quiet --no-deps '$(FLA_SPEC)' einops
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -m protein_performer.demo output_dir=$(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# the results page and the studies page, from the JSON the benchmarks and studies write
results: $(STAMP)
	$(PY) benchmarks/report.py

bench: $(STAMP)
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/learning_check.py
	$(PY) benchmarks/report.py

# the studies publish their JSON + PNG into benchmarks/results/studies/ (their own markdown goes to
# study_results/); the results pages are then regenerated from the JSON
studies: $(STAMP)
	for s in causal_generation approximation speed compatibility redraw; do \
		$(PY) -m protein_performer.studies.$$s --out-dir benchmarks/results/studies \
		    --markdown study_results/studies.md || exit 1; done
	$(PY) benchmarks/report.py

notebooks: $(STAMP)
	$(PY) notebooks/execute.py

# one Pfam family of the shared pfam40 set: train, export, score the mean APC map against the family's
# kortemme40 structure; checkpoint at $(OUT)/checkpoints/last.ckpt, scores in $(OUT)/summary.json.
# RECIPE=aligned (default): factored attention on the family aligned to the chain (10 min of training);
# RECIPE=unaligned: the 4 x 128 Performer-ReLU on raw domains, its contact head for predict_contacts
# A finished OUT is never rerun over by accident: ARGS=resume=true says it is complete (or runs the
# stages not done), ARGS=overwrite=true reruns into a staging folder that replaces OUT when complete
RECIPE      ?= aligned
ARGS        ?=
RECIPE_ARGS_aligned   = experiment=family_contacts_aligned align=true
RECIPE_ARGS_unaligned = experiment=family_contacts homologs=64
family-contacts: $(STAMP)
	$(PY) -m protein_performer.family_contacts family=$(FAMILY) output_dir=$(OUT) \
	    input=$(SHARED_DATA)/pfam40_domains.fasta.gz structures=$(SHARED_DATA)/structures/kortemme40 \
	    $(RECIPE_ARGS_$(RECIPE)) $(ARGS)

# a protein of LENGTH residues (Swiss-Prot records joined) through the trembl_concat_8192 shape with
# rotary positions, random init: every map in tiles, memory linear in L (~2.4 GB of disk at 35,000)
LENGTH      ?= 35000
LONG_OUT    ?= long_protein_out
long-protein: $(STAMP)
	PP_SHARED_DATA=$(SHARED_DATA) $(PY) benchmarks/long_protein.py --length $(LENGTH) --out $(LONG_OUT)

clean:
	rm -rf $(VENV) $(DEMO_DIR) build dist *.egg-info
