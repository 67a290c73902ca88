#!/bin/sh
# The fuzzer of tests/fuzz_test.ts against nbdkit (C), for comparison; not
# part of the suite. Usage: tests/fuzz_nbdkit.sh [--runs=5] [--cases=3000]
# (NBDKIT_TS_RUNTIME=bun runs the script, and our server, on Bun.)
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
case "${NBDKIT_TS_RUNTIME:-deno}" in
  bun) exec "$root/node_modules/.bin/bun" "$root/tests/fuzz_nbdkit.ts" "$@" ;;
  *) exec "$root/node_modules/.bin/deno" run -A --no-check "$root/tests/fuzz_nbdkit.ts" "$@" ;;
esac
