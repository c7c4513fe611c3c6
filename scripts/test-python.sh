#!/usr/bin/env bash
# Python toolkit suite: lint (ruff) and the fast pytest tests on tiny synthetic configs.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check models
.venv/bin/python -m pytest -q models/tests
