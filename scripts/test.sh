#!/usr/bin/env bash
# The README's test command (`make test`): set up, then run every test suite of the project.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
passed=0
failed=0
# The interop suite (Python clients and pydicom against the server binary), the schemathesis run and the benchmark
# smoke run (tiny counts, never judged on a number) reuse the debug build of test-rust.sh.
for suite in scripts/test-python.sh scripts/test-rust.sh scripts/test-fuzz.sh scripts/test-interop.sh scripts/test-schema.sh "scripts/bench.sh --smoke" scripts/test-deploy.sh; do
  echo "=== $suite"
  if $suite; then passed=$((passed + 1)); else echo "FAILED: $suite"; failed=$((failed + 1)); fi
done
echo "suites: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
