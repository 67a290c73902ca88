# Sourced by the bench scripts: sets NBDKIT_TS, our server's command line,
# unless the caller set it, and defines now and median. RUNTIME=bun runs it on Bun, RUNTIME=node on Node
# with the npm build (deno task build:npm first); Deno otherwise. ROOT is the
# repository.
if [[ -z ${NBDKIT_TS:-} ]]; then
  if [[ ${RUNTIME:-deno} == bun ]]; then
    NBDKIT_TS="$ROOT/node_modules/.bin/bun $ROOT/cli.ts"
  elif [[ ${RUNTIME:-deno} == node ]]; then
    NBDKIT_TS="node $ROOT/npm/dist/esm/cli.js"
    [[ -f $ROOT/npm/dist/esm/cli.js ]] || { echo "no npm build: run deno task build:npm" >&2; exit 1; }
  else
    NBDKIT_TS="$ROOT/node_modules/.bin/deno run -A --no-check $ROOT/cli.ts"
  fi
fi

# Seconds since the epoch, with nanoseconds.
now() { date +%s.%N; }

# The median of the numbers on standard input, one per line.
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
