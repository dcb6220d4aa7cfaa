# qstar-mini: two commands do everything, `make demo` and `make test` (see README.md).
#
# Which Python: the environment you are in, else one of our own.
#   - inside an activated venv ($VIRTUAL_ENV) or conda/mamba env ($CONDA_PREFIX): its `python`;
#   - otherwise a `.venv` in this folder, created with `python3 -m venv` on first use.
# Torch: an importable torch is kept as it is (Colab's, a CUDA build, ...); when there is none,
# torch==$(TORCH_VERSION) is installed first, from $(TORCH_INDEX) when that is set, e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (PyPI's default Linux wheel is the large CUDA build; that index serves the small CPU one).
# Installs are remembered by a stamp file inside the environment, redone when pyproject.toml
# changes, so a second `make test` goes straight to the tests.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON3       ?= python3
TORCH_VERSION ?= 2.13.0
TORCH_INDEX   ?=

ifneq ($(strip $(VIRTUAL_ENV)),)
  ENV_DIR := $(VIRTUAL_ENV)
else ifneq ($(strip $(CONDA_PREFIX)),)
  ENV_DIR := $(CONDA_PREFIX)
else
  ENV_DIR := $(CURDIR)/.venv
  OWN_VENV := 1
endif
PY := $(ENV_DIR)/bin/python

# One stamp per (environment, checkout): two clones may share one conda environment.
REPO_ID   := $(shell printf '%s' "$(CURDIR)" | cksum | cut -d' ' -f1)
STAMP_RUN := $(ENV_DIR)/.qstar-mini-$(REPO_ID)-run.stamp
STAMP_DEV := $(ENV_DIR)/.qstar-mini-$(REPO_ID)-dev.stamp

DATA_DIR  := data
TINY_BASE := $(DATA_DIR)/tiny-base
TINY_BASE_NOISY := $(DATA_DIR)/tiny-base-noisy
NOISY_FLAGS ?= --frac-working 0.8 --working-error 0.12

.PHONY: help setup setup-dev demo reproduce test data pretrain clean

help:
	@echo "make demo       set up (if needed); the base model with and without working, then Quiet-STaR and its controls trained and evaluated (runs/demo/)"
	@echo "make reproduce  all seeds and controls behind README's results tables (runs/reproduce/; qstar-mini reproduce reproduce)"
	@echo "make test       set up with the dev extras (if needed), then run pytest (unit tests + notebooks)"
	@echo "make setup      install the package with the notebooks extra into $(ENV_DIR)"
	@echo "make setup-dev  install the package with the dev and notebooks extras into $(ENV_DIR)"
	@echo "make data       regenerate the corpus under $(DATA_DIR)/ (byte-identical to the committed one)"
	@echo "make pretrain   pretrain the tiny base models into $(TINY_BASE)/ and $(TINY_BASE_NOISY)/ (CPU minutes)"
	@echo "make smollm2    fetch the real SmolLM2-135M-Instruct once into the cache (qstar-mini models fetch smollm2)"
	@echo "make real       Quiet-STaR vs the equally weighted control on SmolLM2, own/random/shuffled thoughts (runs/real/real_report.json; qstar-mini real)"
	@echo "make compat     opt-in: the compatibility matrix, the whole suite on each declared stack (scripts/compat.py; ROWS=low,... for some)"
	@echo "make nbgrader-check opt-in: real nbgrader 0.9.6 on notebooks 02-05 as four students (instructor, a correct answer that warns, a cheater, a deleted check cell; scripts/nbgrader_check.sh)"
	@echo "make colab-check    opt-in: every notebook, setup cell included, twice, in a Colab-like environment (ipywidgets 7.7.1, a google.colab stand-in, a local clone; scripts/colab_check.sh)"
	@echo "make browser-check  opt-in: notebooks 01, 02, 08 in JupyterLab + headless Chromium, one control per explorer moved (scripts/browser_check.py; needs /usr/bin/chromium)"
	@echo "make clean      remove caches and build output (keeps .venv, data/ and runs/)"
	@echo "Every job is a qstar-mini subcommand: $(PY) -m qstar_mini --help lists them (reproduce ablations, bench, harness, ...)"
	@echo "Python used: $(PY)"

setup: $(STAMP_RUN)
setup-dev: $(STAMP_DEV)

demo: $(STAMP_RUN)
	$(PY) -m qstar_mini demo

reproduce: $(STAMP_RUN)
	$(PY) -m qstar_mini reproduce reproduce

# The real model (SmolLM2) is fetched like a user fetches it (once; later runs only verify it):
# notebook 10 and tests/models/test_pretrained.py use it.
# Two pytest workers (pytest-xdist): the notebooks and the CLI matrix on one, in order (conftest.py),
# the other tests shared out. TEST_WORKERS=0 runs everything in one process.
# The lowest transformers we declare is also fetched (pip --target, about 10 MB, once), so that
# tests/test_compat.py loads everything we save with it.
TEST_WORKERS ?= 2
LOWEST_TRANSFORMERS := .compat/lowest-transformers
test: $(STAMP_DEV)
	$(PY) -m qstar_mini models fetch smollm2
	$(PY) scripts/compat.py lowest-transformers $(LOWEST_TRANSFORMERS)
	$(PY) -m pytest -n $(TEST_WORKERS)

data: $(STAMP_RUN)
	$(PY) -m qstar_mini data --out $(DATA_DIR)

# Two bases: clean working (the corpus in data/), and a noisy one whose own working is only
# partly right (a corpus made in memory: more lines with working, some steps deliberately wrong).
pretrain: $(STAMP_RUN)
	$(PY) -m qstar_mini pretrain --data $(DATA_DIR) --out $(TINY_BASE) --overwrite
	$(PY) -m qstar_mini pretrain --out $(TINY_BASE_NOISY) --overwrite $(NOISY_FLAGS)

# A real pretrained model (SmolLM2-135M-Instruct), downloaded and converted once into the cache
# (QSTAR_MINI_CACHE, else ~/.cache/qstar_mini); the real extra brings gguf, needed to convert it.
STAMP_REAL := $(ENV_DIR)/.qstar-mini-$(REPO_ID)-real.stamp

.PHONY: smollm2
smollm2: $(STAMP_REAL)
	$(PY) -m qstar_mini models fetch smollm2

# Quiet-STaR on SmolLM2 against a control with the same loss weighting and no thought, 3 seeds, on word
# problems split by template (qstar-mini real: qstar_mini/studies/real_text.py; runs/real/real_report.json;
# docs/real-model.md gives the time: about an hour on 2 CPU cores).
.PHONY: real
real: smollm2
	$(PY) -m qstar_mini real

$(STAMP_REAL): pyproject.toml $(STAMP_RUN)
	$(PY) -m pip install -e ".[real]"
	@touch $@

# The compatibility matrix (opt-in; docs/compatibility.md gives its cost): the whole suite in
# one environment per declared stack, each built from a clone of HEAD (commit first) under .compat/.
# ROWS=low,colab runs some rows; `python3 scripts/compat.py --list` names them.
.PHONY: compat
compat:
	$(PYTHON3) scripts/compat.py $(if $(ROWS),--rows $(ROWS))

# Opt-in checks (minutes, not part of `make test`): docs/commands.md gives their times.
# colab-check clones this checkout's HEAD (commit first); COLAB_CHECK_DIR says where it works.
.PHONY: colab-check browser-check nbgrader-check
nbgrader-check: $(STAMP_DEV)
	bash scripts/nbgrader_check.sh $(PY)

colab-check: $(STAMP_DEV)
	bash scripts/colab_check.sh $(PY)

browser-check: $(STAMP_RUN)
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install playwright
	$(PY) scripts/browser_check.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis
	find . -path ./.venv -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -print0 \
		| xargs -0 rm -rf

# ---- environment -------------------------------------------------------------------------

# Install torch only when none is importable, so that an existing (e.g. CUDA) build is kept.
define ensure_torch
	@if $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "make: keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "make: no torch in $(ENV_DIR); installing torch==$(TORCH_VERSION)$(if $(TORCH_INDEX), from $(TORCH_INDEX))"; \
		$(PY) -m pip install "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)); \
	fi
endef

$(STAMP_RUN): pyproject.toml | $(PY)
	$(ensure_torch)
	$(PY) -m pip install -e ".[notebooks,lab]"
	@touch $@

$(STAMP_DEV): pyproject.toml | $(PY)
	$(ensure_torch)
	$(PY) -m pip install -e ".[dev,notebooks,lab]"
	@touch $@

ifdef OWN_VENV
$(PY):
	@$(PYTHON3) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "make: qstar-mini needs Python >= 3.10; $(PYTHON3) is " + sys.version.split()[0] + " (set PYTHON3=/path/to/python3.x)")'
	$(PYTHON3) -m venv $(ENV_DIR)
else
$(PY):
	@echo "make: $(PY) not found: the environment $(ENV_DIR) has no python (conda: 'conda install python pip')" >&2
	@exit 1
endif
