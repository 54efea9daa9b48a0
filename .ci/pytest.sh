#!/usr/bin/env bash
# Runs the suite in the stream environment (model-side tests call .venv-model themselves), then lint.
# pytest-xdist: three workers (most of the suite's time is waiting on servers it starts; tests of the session's
# vLLM server stay on one worker, tests/conftest.py). pytest exit 5 (no tests collected) is a failure here.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest -n 3 --dist loadgroup "$@"
.venv/bin/ruff check .
