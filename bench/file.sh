#!/usr/bin/env bash
# Benchmark of the file plugin against nbdkit's, on one 1 GiB file of random
# data held in the page cache, in the same run:
#
#   fio 4 KiB random read, QD16      (IOPS)
#   fio 1 MiB sequential read, QD4   (MiB/s)
#   nbdcopy of the whole file to null: (time; 256 KiB requests on 4 connections)
#
# Rounds alternate between the two servers (the machine's noise hits both
# alike); each prints its figures, then the medians and the ratios ours ÷
# nbdkit's (higher is better for fio, lower for nbdcopy's time).
#
# Usage: bench/file.sh [ROUNDS]      (default 3)
# Environment: NBDKIT_TS   our command line (default: Deno from node_modules)
#              RUNTIME=bun use Bun instead of Deno; RUNTIME=node, Node on the
#                          npm build (deno task build:npm first)
#              BENCH_DIR   where the file goes (default bench/out, reused)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/bin:/usr/sbin:/bin:$PATH"
ROOT=$PWD
ROUNDS=${1:-3}
DIR=${BENCH_DIR:-$ROOT/bench/out}
source "$ROOT/bench/ours.sh"
for tool in fio nbdcopy nbdkit python3; do
  command -v $tool >/dev/null || { echo "bench/file.sh: $tool is needed (.ci/setup)" >&2; exit 1; }
done

mkdir -p "$DIR"
FILE=$DIR/file-1g.raw
[[ -f $FILE ]] || head -c 1G /dev/urandom >"$FILE"
cat "$FILE" >/dev/null # into the page cache: the disk is not what is measured
SOCK=$(mktemp -u /tmp/nbdkit-ts-file-bench.XXXXXX)
URI="nbd+unix:///?socket=$SOCK"
OUT=$(mktemp /tmp/nbdkit-ts-file-bench.XXXXXX.json)
trap 'rm -f "$SOCK" "$OUT"' EXIT

# fio's figure for one job: read IOPS, or MiB/s with "bw".
fio_job() {
  fio --name=b --ioengine=nbd --uri="$URI" --rw="$1" --bs="$2" --iodepth="$3" --runtime=5 \
    --time_based --size=1G --output-format=json --output="$OUT" >/dev/null 2>&1
  python3 -c "import json,sys; r=json.load(open('$OUT'))['jobs'][0]['read']; \
print(round(r['bw_bytes']/1048576) if sys.argv[1]=='bw' else round(r['iops']))" "$4"
}

# One round with one server: "IOPS MiB/s seconds".
round() {
  rm -f "$SOCK"
  if [[ $1 == nbdkit ]]; then nbdkit -f -U "$SOCK" file "$FILE" & else $NBDKIT_TS -f -U "$SOCK" file "$FILE" & fi
  local pid=$! i
  for i in $(seq 100); do [[ -S $SOCK ]] && break; sleep 0.1; done
  local iops mibs start end
  iops=$(fio_job randread 4k 16 iops)
  mibs=$(fio_job read 1M 4 bw)
  start=$(date +%s.%N)
  nbdcopy "$URI" null:
  end=$(date +%s.%N)
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  echo "$iops $mibs $(python3 -c "print(round($end - $start, 3))")"
}

median() { python3 -c "import statistics,sys; print(statistics.median(map(float, sys.argv[1:])))" "$@"; }

declare -a OI OM OT NI NM NT
echo "file plugin, 1 GiB cached file, $ROUNDS rounds, $(nproc) cores, ours on ${RUNTIME:-deno}"
for r in $(seq "$ROUNDS"); do
  read -r i m t < <(round ours)
  OI+=("$i") OM+=("$m") OT+=("$t")
  echo "  round $r ours   4k randread $i IOPS  1M read $m MiB/s  nbdcopy $t s"
  read -r i m t < <(round nbdkit)
  NI+=("$i") NM+=("$m") NT+=("$t")
  echo "  round $r nbdkit 4k randread $i IOPS  1M read $m MiB/s  nbdcopy $t s"
done
oi=$(median "${OI[@]}") om=$(median "${OM[@]}") ot=$(median "${OT[@]}")
ni=$(median "${NI[@]}") nm=$(median "${NM[@]}") nt=$(median "${NT[@]}")
echo "median ours   $oi IOPS  $om MiB/s  $ot s"
echo "median nbdkit $ni IOPS  $nm MiB/s  $nt s"
python3 -c "print('ratios ours/nbdkit: 4k randread %.2fx, 1M read %.2fx, nbdcopy time %.2fx' % ($oi/$ni, $om/$nm, $ot/$nt))"
