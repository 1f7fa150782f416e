# `make demo` and `make test` each create .venv on a fresh machine (Python >= 3.10) and then run.
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

# constraints.txt pins torch 2.13.0, whose CPU build is what these machines install; a looser pin pulls CUDA.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[embedded,test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/specialist run examples/log-to-json/config.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) runs
