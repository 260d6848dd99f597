# The two commands of README.md:
#   make demo   set up, train the demo on the built-in Shapes data, print ShapesEval scores
#   make test   set up, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: setup demo test clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m unimm.train --config configs/demo.py --workdir $(WORKDIR)

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
