# The two commands a user needs (see README.md):
#   make demo   prep the bundled corpus, pretrain a tiny BERT, evaluate, export to HF
#   make test   run the test suite
# Both create .venv and install everything from this repository's own files first.
PYTHON ?= python3
VENV ?= .venv
# The CPU machine has torch 2.13.0 (+cpu) on local disk; on a GPU machine the same pin pulls
# the matching CUDA wheel from PyPI.  Override with e.g. TORCH_SPEC='torch==2.13.0'.
TORCH_SPEC ?= torch==2.13.0
DEEPSPEED_SPEC ?= deepspeed==0.19.8
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.bertforge-installed

.PHONY: demo test install clean-venv

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade 'setuptools>=68' wheel
	$(PIP) install -q '$(TORCH_SPEC)'
	# DeepSpeed ships only an sdist: build it against the torch above, never an isolated (CUDA) one.
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation '$(DEEPSPEED_SPEC)'
	$(PIP) install -q --no-build-isolation -e '.[dev,mpi]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m pretrain demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
