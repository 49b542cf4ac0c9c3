# Quick start: `make demo` (train + summarise on Fashion-MNIST) and `make test`.
# Both install first (once; the stamp file remembers), so either works on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed
DEMO_DIR ?= demo

RESULTS ?= results
JOBS ?= 2

.PHONY: install test test-fast test-slow lint fuzz demo reproduce reproduce-protocol reproduce-vit clean

install: $(STAMP)

# torch: a torch already installed within setup.cfg's range is kept (only a matching torchvision is
# added if missing); the pinned torch 2.14.1 / torchvision 0.29.1 are installed only when there is none.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu picks the CPU-only wheels; FORCE_TORCH=1 replaces
# an installed torch that is outside the supported range.
TORCH_INDEX ?=

$(STAMP): setup.cfg pyproject.toml
	$(PIP) install --quiet "setuptools>=64" wheel
	@reqs="$$($(PYTHON) scripts/torch_requirements.py)" || exit 1; \
	if [ -n "$$reqs" ]; then \
	  echo "installing $$reqs$(if $(TORCH_INDEX), from $(TORCH_INDEX))"; \
	  $(PIP) install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $$reqs || exit 1; \
	fi
	$(PIP) install --quiet --no-build-isolation -e ".[test]"
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "note: could not install Debian's dataset-fashion-mnist; fashion-mnist needs --data-dir or --download"; \
	fi
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

# The tests run in TEST_WORKERS processes (pytest-xdist; auto = one per core, at most 4); TEST_WORKERS=0 runs
# them in this process.
TEST_WORKERS ?= auto
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --maxprocesses 4 --dist worksteal)

test: install
	$(PYTHON) -m pytest -q $(XDIST)

# The same minus the `integration` tests (torchrun processes, SIGKILLed runs) and the `heavy` ones (1.5 s or more
# in process: large-model oracles, fuzz-reader kinds, plots, stochastic convergence): the quick loop while editing.
test-fast: install
	$(PYTHON) -m pytest -q $(XDIST) -m "not slow and not integration and not heavy"

# pyflakes, import order, docstrings on public functions (config: pyproject.toml [tool.ruff]).
lint: install
	$(PYTHON) -m ruff check .

test-slow: install
	$(PYTHON) -m pytest -q $(XDIST) -m slow

# Reliability, long version: thousands of corrupt-file mutants per artifact kind and repeated SIGKILLs
# of train / hessian-diag / measure (see RELIABILITY.md). NFM_FUZZ_COUNT sets mutants per kind.
fuzz: install
	$(PYTHON) -m pytest -q $(XDIST) -m slow tests/reliability/test_fuzz.py tests/reliability/test_kill.py

# Three MLPs on a Fashion-MNIST subset with 0%, 30% and 100% random labels, each measured, then a
# per-run table and figure1.png (a few minutes on 2 cores). DATA_DIR=folder and DOWNLOAD=1 are passed
# to nfm train; without Fashion-MNIST the demo falls back, with a note, to the synthetic set.
demo: install
	DATA_DIR="$(DATA_DIR)" DOWNLOAD="$(DOWNLOAD)" PYTHON="$(PYTHON)" scripts/demo.sh $(DEMO_DIR)

# Sec. 6 at CPU scale: 22 MLPs on 1024 Fashion-MNIST samples, random-label ratios 0.0..1.0 with two
# seeds each (scripts/grids/reproduce.toml), trained 60 epochs to ~100% training accuracy, measured,
# reported. One `nfm sweep`: resumable (rerun skips finished runs), $(JOBS) runs at once.
reproduce: install
	nfm sweep --grid-file scripts/grids/reproduce.toml --out $(RESULTS)/runs --jobs $(JOBS)
	nfm report $(RESULTS)/runs/*.measures.safetensors --plot $(RESULTS)/plots --csv $(RESULTS)/runs.csv \
	  --json -q > $(RESULTS)/correlations.json
	COLUMNS=150 nfm report $(RESULTS)/runs/*.measures.safetensors -q > $(RESULTS)/correlations.txt
	cat $(RESULTS)/correlations.txt

# Issue 11: the field's protocol at CPU scale (scripts/reproduce_protocol.sh): Jiang et al.-style MLP
# grids (Adam, SGD, training-set size) scored with the rival measures (report --protocol), and
# random-label sweeps of LeNet and of a BatchNorm WRN-10-1 before and after `nfm rescale --mode bn`.
# About 1.5 h on 2 cores; resumable.
reproduce-protocol: install
	JOBS=$(JOBS) scripts/reproduce_protocol.sh $(RESULTS)/protocol

# Issue 21: the random-label protocol on vit-tiny (scripts/grids/vit-random.toml, AdamW with a warm-up),
# measured (the default estimator: Gauss-Newton for ViTs; and hutchinson), every checkpoint rescaled with
# `nfm rescale --mode all` (attention heads and LayerNorms: the same function) and measured again
# (scripts/reproduce_vit.sh). Writes $(RESULTS)/vit/; resumable.
reproduce-vit: install
	JOBS=$(JOBS) scripts/reproduce_vit.sh $(RESULTS)/vit

clean:
	rm -rf $(DEMO_DIR) .make build *.egg-info
