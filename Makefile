# featurestore: `make demo` and `make test` set everything up on a fresh clone (a .venv with the
# CPU pins of constraints-cpu.txt). `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FS := $(VENV)/bin/featurestore
INSTALLED := $(VENV)/.installed

DATASET ?= demo
BACKBONE ?= ddpm-mnist
TIMESTEPS ?= 10,100,300
BLOCKS ?= all
STORE ?= stores/$(DATASET)-$(BACKBONE).zarr
DATA_ROOT ?=
EXTRA ?=

.PHONY: help install test test-fast demo extract clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables for extract: DATASET=$(DATASET) BACKBONE=$(BACKBONE) TIMESTEPS=$(TIMESTEPS) BLOCKS=$(BLOCKS)"
	@echo "                         STORE=$(STORE) DATA_ROOT=<folder> EXTRA='<more extract options>'"
	@echo "                         (TIMESTEPS= for experts, which take none; EXTRA=--dry-run shows size and time first)"

$(INSTALLED): pyproject.toml constraints-cpu.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints-cpu.txt -e '.[test]'
	touch $@

install: $(INSTALLED) ## Create .venv (if missing) and install the project with the CPU pins

test: $(INSTALLED) ## Run the test suite
	$(PY) -m pytest -q

test-fast: $(INSTALLED) ## Run the test suite without the tests marked slow
	$(PY) -m pytest -q -m "not slow"

demo: $(INSTALLED) ## Extract, probe and report on the embedded MNIST default (a few minutes on 2 cores)
	$(FS) demo --out demo-output

extract: $(INSTALLED) ## Extract DATASET (a data_manifests/ name) with BACKBONE into STORE
	$(FS) extract --dataset $(DATASET) $(if $(DATA_ROOT),--data-root $(DATA_ROOT)) --backbone $(BACKBONE) \
		$(if $(TIMESTEPS),--timesteps $(TIMESTEPS)) --blocks $(BLOCKS) --store $(STORE) $(EXTRA)

clean: ## Remove demo output and caches (keeps .venv and stores/)
	rm -rf demo-output .pytest_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -exec rm -rf {} +
