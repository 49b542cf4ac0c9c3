# Quick start: `make demo` (train + summarise on Fashion-MNIST) and `make test`.
# Both install first (once; the stamp file remembers), so either works on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed
DEMO_DIR ?= demo

.PHONY: install test test-slow demo clean

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

test-slow: install
	$(PYTHON) -m pytest -q -m slow

demo: install
	@mkdir -p $(DEMO_DIR)
	nfm train --model mlp --dataset fashion-mnist --train-size 2048 --test-size 2000 --random-ratio 0.3 \
	  --epochs 15 --batch-size 128 --seed 0 --out $(DEMO_DIR)/mlp-r0.3.safetensors
	nfm inspect $(DEMO_DIR)/mlp-r0.3.safetensors

clean:
	rm -rf $(DEMO_DIR) .make build *.egg-info
