#!/usr/bin/env bash
# The whole test suite: static checks, then every test file under Deno, Bun
# and Node (the npm build). `npm test` runs this; so does .ci/run.
# Any stage failing fails the run; a missing tool is a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:/usr/bin:/usr/sbin:$PATH"

stage() { printf '\n=== %s ===\n' "$*"; }

stage "static checks: deno fmt --check, deno lint, deno check"
deno fmt --check
deno lint
deno task -q check

stage "tests under Deno $(deno --version | head -1 | cut -d' ' -f2)"
deno test -A --no-check tests/

stage "tests under Bun $(bun --version)"
bun test --timeout 600000 tests/

echo
echo "all stages passed"
