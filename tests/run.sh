#!/usr/bin/env bash
# The whole test suite: static checks, then every test file under Deno, Bun
# and Node (the npm build). `npm test` runs this; so does .ci/run.
# Any stage failing fails the run; a missing tool is a failure, not a skip.
#
#   bash tests/run.sh                 every stage
#   bash tests/run.sh deno node       only these stages (static, deno, bun, node)
#
# The npm build is made once, in the Node stage, before the tests that use it
# (the Node tests run the server from npm/dist; tests/package_test.ts packs it).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:/usr/bin:/usr/sbin:$PATH"

STAGES=("$@")
[ ${#STAGES[@]} -gt 0 ] || STAGES=(static deno bun node)
for s in "${STAGES[@]}"; do
  case "$s" in
    static | deno | bun | node) ;;
    *)
      echo "tests/run.sh: unknown stage '$s' (static, deno, bun, node)" >&2
      exit 2
      ;;
  esac
done
wanted() { [[ " ${STAGES[*]} " == *" $1 "* ]]; }

stage() { printf '\n=== %s ===\n' "$*"; }

if wanted static; then
  stage "static checks: deno fmt --check, deno lint, deno check"
  deno fmt --check
  deno lint
  deno task -q check
fi

if wanted deno; then
  stage "tests under Deno $(deno --version | head -1 | cut -d' ' -f2)"
  start=$SECONDS
  deno test -A --no-check tests/
  # Every @example in the JSDoc runs, so the documentation cannot drift from the code.
  deno task -q test:doc
  echo "(Deno stage: $((SECONDS - start)) s)"
fi

if wanted bun; then
  stage "tests under Bun $(bun --version)"
  start=$SECONDS
  bun test --timeout 600000 tests/
  echo "(Bun stage: $((SECONDS - start)) s)"
fi

if wanted node; then
  stage "npm build (npm/dist) and the tests compiled for Node (npm/.test-build)"
  start=$SECONDS
  deno run -A npm/build.ts --tests
  echo "(build: $((SECONDS - start)) s)"

  stage "tests under Node $(node --version)"
  start=$SECONDS
  # One file at a time, as Deno and Bun run them; a generous per-test timeout.
  node --test --test-concurrency=1 --test-timeout=600000 npm/.test-build/tests/*_test.js
  echo "(Node stage: $((SECONDS - start)) s)"
fi

echo
echo "all stages passed: ${STAGES[*]}"
