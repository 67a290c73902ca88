#!/usr/bin/env bash
# Benchmark of the streaming plugin: a qcow2 of random data (1 GiB unless
# SIZE says) turned into a raw byte stream read by sha256sum, ours against
# nbdcopy, in the same run.
#
#   ours:    nbdkit-ts -U - streaming write=FIFO --run 'qemu-img convert -n IN -O raw $nbd'
#            with sha256sum < FIFO
#   nbdcopy: nbdcopy -- [ qemu-nbd -f qcow2 IN ] - | sha256sum
#
# Rounds alternate between the two (the machine's noise hits both alike); the
# medians and their ratio are printed, with the peak RSS of our server
# (/usr/bin/time -v, the server and its --run child; qemu-img is the smaller).
# Targets: ratio <= 1.0, peak RSS <= 128 MiB.
#
# Each round also times the floor: sha256sum alone over the same raw bytes,
# from the page cache, with no NBD and no qcow2. Neither pipeline can beat it:
# sha256sum needs a whole core, and both feed it as fast as it reads.
#
# Usage: bench/streaming.sh [ROUNDS]      (default 5)
# Environment: NBDKIT_TS   our command line (default: Deno from node_modules)
#              RUNTIME=bun use Bun instead of Deno; RUNTIME=node, Node on the
#                          npm build (deno task build:npm first)
#              SIZE        the stream's length, as head -c takes it (default 1G)
#              BENCH_DIR   where the images go (default bench/out, reused)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/bin:/usr/sbin:/bin:$PATH"
ROOT=$PWD
ROUNDS=${1:-5}
DIR=${BENCH_DIR:-$ROOT/bench/out}
source "$ROOT/bench/ours.sh"

for tool in qemu-img qemu-nbd nbdcopy sha256sum /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool (apt-get install qemu-utils libnbd-bin time)" >&2; exit 1; }
done

mkdir -p "$DIR"
SIZE=${SIZE:-1G}
RAW=$DIR/random-${SIZE,,}.raw
IN=$DIR/random-${SIZE,,}.qcow2
if [[ -s $IN && -s $RAW.sha256 && ! -s $RAW ]]; then
  qemu-img convert -f qcow2 -O raw "$IN" "$RAW" # for the floor
fi
if [[ ! -s $IN || ! -s $RAW.sha256 || ! -s $RAW ]]; then
  echo "making $IN ($SIZE of random data) ..." >&2
  head -c "$SIZE" /dev/urandom > "$RAW"
  qemu-img convert -f raw -O qcow2 "$RAW" "$IN"
  sha256sum < "$RAW" | cut -d' ' -f1 > "$RAW.sha256"
fi
WANT=$(cat "$RAW.sha256")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# One run of ours: prints "SECONDS RSS_KIB".
ours() {
  local fifo=$WORK/fifo sum=$WORK/ours.sum t0 t1 rss
  rm -f "$fifo"
  mkfifo "$fifo"
  t0=$(now)
  sha256sum < "$fifo" > "$sum" &
  local reader=$!
  /usr/bin/time -v -o "$WORK/ours.time" $NBDKIT_TS -U - streaming "write=$fifo" \
    --run "qemu-img convert -n '$IN' -O raw \"\$nbd\"" 2>"$WORK/ours.err" ||
    { cat "$WORK/ours.err" >&2; exit 1; }
  wait "$reader"
  t1=$(now)
  [[ $(cut -d' ' -f1 "$sum") == "$WANT" ]] || { echo "ours: wrong checksum" >&2; exit 1; }
  rss=$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$WORK/ours.time")
  echo "$(echo "$t1 - $t0" | bc -l) $rss"
}

# One run of nbdcopy: prints "SECONDS RSS_KIB".
peer() {
  local sum=$WORK/peer.sum t0 t1 rss
  t0=$(now)
  /usr/bin/time -v -o "$WORK/peer.time" nbdcopy -- [ qemu-nbd -f qcow2 "$IN" ] - | sha256sum > "$sum"
  t1=$(now)
  [[ $(cut -d' ' -f1 "$sum") == "$WANT" ]] || { echo "nbdcopy: wrong checksum" >&2; exit 1; }
  rss=$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$WORK/peer.time")
  echo "$(echo "$t1 - $t0" | bc -l) $rss"
}

# The floor: sha256sum alone over the raw bytes (cached by the first round).
floor() {
  local t0 t1
  t0=$(now)
  sha256sum < "$RAW" > /dev/null
  t1=$(now)
  echo "$t1 - $t0" | bc -l
}

command -v bc >/dev/null || { echo "missing tool: bc (apt-get install bc)" >&2; exit 1; }
echo "$SIZE qcow2 of random data -> raw stream -> sha256sum, $ROUNDS rounds ($(nproc) cores)"
echo "ours: $NBDKIT_TS"
printf '%-6s %10s %12s %10s %12s %8s\n' round ours_s ours_rss_MiB nbdcopy_s nbdcopy_rss floor_s
: > "$WORK/ours.t"; : > "$WORK/peer.t"; : > "$WORK/ours.rss"; : > "$WORK/floor.t"
cat "$RAW" > /dev/null
for ((i = 1; i <= ROUNDS; i++)); do
  read -r ot orss < <(ours)
  read -r pt prss < <(peer)
  ft=$(floor)
  echo "$ot" >> "$WORK/ours.t"; echo "$pt" >> "$WORK/peer.t"; echo "$orss" >> "$WORK/ours.rss"
  echo "$ft" >> "$WORK/floor.t"
  printf '%-6s %10.2f %12.1f %10.2f %12.1f %8.2f\n' "$i" "$ot" "$(echo "$orss / 1024" | bc -l)" \
    "$pt" "$(echo "$prss / 1024" | bc -l)" "$ft"
done
OM=$(median < "$WORK/ours.t")
PM=$(median < "$WORK/peer.t")
FM=$(median < "$WORK/floor.t")
PEAK=$(sort -g "$WORK/ours.rss" | tail -1)
printf 'median: ours %.2f s, nbdcopy %.2f s, ratio %.2f (target <= 1.0)\n' "$OM" "$PM" \
  "$(echo "$OM / $PM" | bc -l)"
printf 'floor: sha256sum alone %.2f s; ours %.2fx of it, nbdcopy %.2fx\n' "$FM" \
  "$(echo "$OM / $FM" | bc -l)" "$(echo "$PM / $FM" | bc -l)"
printf 'peak RSS of our server: %.1f MiB (target <= 128)\n' "$(echo "$PEAK / 1024" | bc -l)"
