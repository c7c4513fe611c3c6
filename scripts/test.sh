#!/usr/bin/env bash
# The README's test command (`make test`): set up, then run every test suite of the project.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
status=0
for suite in scripts/test-python.sh scripts/test-rust.sh scripts/test-deploy.sh; do
  if [ -x "$suite" ]; then
    echo "=== $suite"
    "$suite" || status=1
  fi
done
exit $status
