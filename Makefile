# Quick start: `make demo` (train + summarise on Fashion-MNIST) and `make test`.
# Both install first (once; the stamp file remembers), so either works on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed
DEMO_DIR ?= demo

RESULTS ?= results
RUNS ?= 22
JOBS ?= 2

.PHONY: install test test-fast test-slow lint fuzz demo reproduce clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PIP) install --quiet "setuptools>=64" wheel
	$(PIP) install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install --quiet --no-build-isolation -e ".[test]"
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "note: could not install Debian's dataset-fashion-mnist; fashion-mnist needs --data-dir or --download"; \
	fi
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

test: install
	$(PYTHON) -m pytest -q

# The same minus the `integration` tests (torchrun processes, SIGKILLed runs): the quick loop while editing.
test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not integration"

# pyflakes, import order, docstrings on public functions (config: pyproject.toml [tool.ruff]).
lint: install
	$(PYTHON) -m ruff check .

test-slow: install
	$(PYTHON) -m pytest -q -m slow

# Reliability, long version: thousands of corrupt-file mutants per artifact kind and repeated SIGKILLs
# of train / hessian-diag / measure (see RELIABILITY.md). NFM_FUZZ_COUNT sets mutants per kind.
fuzz: install
	$(PYTHON) -m pytest -q -m slow tests/test_reliability_fuzz.py tests/test_reliability_kill.py

# The main job on an embedded default: three MLPs on a Fashion-MNIST subset with 0%, 30% and 100%
# random labels, each measured, then the correlation report (a few minutes on 2 cores).
demo: install
	@mkdir -p $(DEMO_DIR)
	for r in 0.0 0.3 1.0; do \
	  nfm train --model mlp --dataset fashion-mnist --train-size 512 --test-size 1000 --random-ratio $$r \
	    --epochs 40 --batch-size 128 --seed 0 --quiet --out $(DEMO_DIR)/mlp-r$$r.safetensors || exit 1; \
	  nfm measure $(DEMO_DIR)/mlp-r$$r.safetensors > /dev/null || exit 1; \
	done
	nfm inspect $(DEMO_DIR)/mlp-r0.3.safetensors
	nfm report $(DEMO_DIR)/*.measures.safetensors --csv $(DEMO_DIR)/runs.csv

# Sec. 6 at CPU scale: $(RUNS) MLPs on 1024 Fashion-MNIST samples, ratios 0.0..1.0 (run i gets
# ratio i mod 11 and seed i), trained 60 epochs to ~100% training accuracy, measured, reported.
# Resumable (rerun skips finished runs) and parallel ($(JOBS) runs at once).
reproduce: install
	@mkdir -p $(RESULTS)/runs
	seq 0 $$(( $(RUNS) - 1 )) | OMP_NUM_THREADS=$$(( $$(nproc) / $(JOBS) > 0 ? $$(nproc) / $(JOBS) : 1 )) \
	  xargs -P $(JOBS) -I{} scripts/sweep_run.sh {} $(RESULTS)/runs
	nfm report $(RESULTS)/runs/*.measures.safetensors --plot $(RESULTS)/plots --csv $(RESULTS)/runs.csv \
	  --json > $(RESULTS)/correlations.json
	nfm report $(RESULTS)/runs/*.measures.safetensors > $(RESULTS)/correlations.txt
	cat $(RESULTS)/correlations.txt

clean:
	rm -rf $(DEMO_DIR) .make build *.egg-info
