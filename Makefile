# Two commands do all set-up on a fresh machine:  `make search` (the digits default) and `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: install search test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade 'pip>=23' -c constraints.txt setuptools
	$(VENV)/bin/pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Search the digits space, then retrain the exported architecture from scratch (writes runs/digits/).
search: install
	$(VENV)/bin/nni-idarts search examples/configs/digits.yaml --overwrite
	$(VENV)/bin/nni-idarts retrain examples/configs/digits.yaml --arch runs/digits/arch.json

test: install
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
