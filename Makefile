# cmmas: two commands do everything on a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GPU ?= 0
TF_EXTRA := $(if $(filter 1,$(GPU)),gpu,cpu)
STAMP := $(VENV)/.installed-$(TF_EXTRA)

# oneDNN: 3-5x faster 3D convolutions on CPU (GUIDE.md section 5); quiet TensorFlow logs.
export TF_ENABLE_ONEDNN_OPTS := 1
export TF_CPP_MIN_LOG_LEVEL := 2
export PYTHONUNBUFFERED := 1

RUN ?= runs/demo

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -e ".[$(TF_EXTRA)]"
	touch $@

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m cmmas.datasets.phantom --out $(RUN)/data --n 20 --preview $(RUN)/phantom_preview.png

clean:
	rm -rf runs
