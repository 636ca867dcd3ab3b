# Two entry points for a newcomer:  `make serve`  and  `make test`.
# Both create the virtual environment on first use (torch's CPU build is pinned first).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install serve test protos clean

$(STAMP): pyproject.toml protos/cast/v1/cast.proto
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	$(MAKE) protos
	touch $@

install: $(STAMP)

## Generate the gRPC Python modules from protos/ (never edited by hand).
protos:
	$(PY) -m services.grpc_api.codegen

## Start a local Ray, fetch the default model pair on first use, serve HTTP + gRPC.
serve: $(STAMP)
	$(VENV)/bin/cast serve

## Run the whole test suite (CPU only; tiny models and SmolLM2-135M).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
