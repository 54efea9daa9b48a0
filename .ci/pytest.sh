#!/usr/bin/env bash
# Runs the suite in the stream environment (model-side tests call .venv-model themselves),
# then lint. pytest exit 5 (no tests collected) is a failure here.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
.venv/bin/ruff check .
