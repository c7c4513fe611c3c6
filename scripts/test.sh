#!/usr/bin/env bash
# The README's test command (`make test`): set up, then run every test suite of the project.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
status=0
# The benchmark smoke run (tiny counts, never judged on a number) reuses the debug build of test-rust.sh
# and keeps the benchmark commands working.
for suite in scripts/test-python.sh scripts/test-rust.sh "scripts/bench.sh --smoke" scripts/test-deploy.sh; do
  echo "=== $suite"
  $suite || { echo "FAILED: $suite"; status=1; }
done
exit $status
