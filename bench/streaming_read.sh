#!/usr/bin/env bash
# Benchmark of the streaming plugin's read mode, the reverse of
# bench/streaming.sh: a raw byte stream (1 GiB of random data unless SIZE
# says) from `cat` becomes a qcow2 image, ours against nbdcopy, in the same
# run. The image is written on tmpfs (/dev/shm) so that no disk is timed.
#
#   ours:    cat RAW > FIFO & nbdkit-ts -U - streaming read=FIFO size=SIZE
#              --run 'qemu-img convert -n -f raw $uri -O qcow2 OUT'
#   nbdcopy: cat RAW | nbdcopy - [ qemu-nbd -f qcow2 OUT ]
#
# Rounds alternate between the two; each image is compared with the raw
# bytes (qemu-img compare). Prints every round, the medians, their ratio
# (lower is better for us) and the peak RSS of our server (/usr/bin/time -v:
# the server and its --run child, qemu-img).
#
# Usage: bench/streaming_read.sh [ROUNDS]      (default 5)
# Environment: NBDKIT_TS, RUNTIME, SIZE, BENCH_DIR as bench/streaming.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/bin:/usr/sbin:/bin:$PATH"
ROOT=$PWD
ROUNDS=${1:-5}
DIR=${BENCH_DIR:-$ROOT/bench/out}
source "$ROOT/bench/ours.sh"

for tool in qemu-img qemu-nbd nbdcopy bc /usr/bin/time; do
  command -v "$tool" >/dev/null || { echo "missing tool: $tool (.ci/setup)" >&2; exit 1; }
done

mkdir -p "$DIR"
SIZE=${SIZE:-1G}
RAW=$DIR/random-${SIZE,,}.raw
if [[ ! -s $RAW ]]; then
  echo "making $RAW ($SIZE of random data) ..." >&2
  head -c "$SIZE" /dev/urandom > "$RAW"
fi
BYTES=$(stat -c %s "$RAW")
WORK=$(mktemp -d)
OUT=$(mktemp -d /dev/shm/nbdkit-ts-bench-XXXXXX)
trap 'rm -rf "$WORK" "$OUT"' EXIT

# A fresh qcow2 of the stream's size at $OUT/$1.
image() {
  rm -f "$OUT/$1"
  qemu-img create -q -f qcow2 "$OUT/$1" "$BYTES"
}

# The image at $OUT/$1 holds the raw bytes, or the run stops.
check() {
  qemu-img compare -q -f qcow2 -F raw "$OUT/$1" "$RAW" ||
    { echo "$2: the image differs from the stream" >&2; exit 1; }
}

# One run of ours: prints "SECONDS RSS_KIB".
ours() {
  local fifo=$WORK/fifo t0 t1 rss
  image ours.qcow2
  rm -f "$fifo"
  mkfifo "$fifo"
  t0=$(now)
  cat "$RAW" > "$fifo" &
  local writer=$!
  /usr/bin/time -v -o "$WORK/ours.time" $NBDKIT_TS -U - streaming "read=$fifo" "size=$BYTES" \
    --run "qemu-img convert -n -f raw \"\$uri\" -O qcow2 '$OUT/ours.qcow2'" 2>"$WORK/ours.err" ||
    { cat "$WORK/ours.err" >&2; exit 1; }
  wait "$writer"
  t1=$(now)
  check ours.qcow2 ours
  rss=$(awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$WORK/ours.time")
  echo "$(echo "$t1 - $t0" | bc -l) $rss"
}

# One run of nbdcopy: prints "SECONDS".
peer() {
  local t0 t1
  image peer.qcow2
  t0=$(now)
  cat "$RAW" | nbdcopy - -- [ qemu-nbd -f qcow2 "$OUT/peer.qcow2" ]
  t1=$(now)
  check peer.qcow2 nbdcopy
  echo "$t1 - $t0" | bc -l
}

echo "$SIZE raw stream -> qcow2 on tmpfs, $ROUNDS rounds ($(nproc) cores)"
echo "ours: $NBDKIT_TS"
printf '%-6s %10s %12s %10s\n' round ours_s ours_rss_MiB nbdcopy_s
: > "$WORK/ours.t"; : > "$WORK/peer.t"; : > "$WORK/ours.rss"
cat "$RAW" > /dev/null
for ((i = 1; i <= ROUNDS; i++)); do
  read -r ot orss < <(ours)
  pt=$(peer)
  echo "$ot" >> "$WORK/ours.t"; echo "$pt" >> "$WORK/peer.t"; echo "$orss" >> "$WORK/ours.rss"
  printf '%-6s %10.2f %12.1f %10.2f\n' "$i" "$ot" "$(echo "$orss / 1024" | bc -l)" "$pt"
done
OM=$(median < "$WORK/ours.t")
PM=$(median < "$WORK/peer.t")
PEAK=$(sort -g "$WORK/ours.rss" | tail -1)
printf 'median: ours %.2f s, nbdcopy %.2f s, ratio %.2f (lower is better)\n' "$OM" "$PM" \
  "$(echo "$OM / $PM" | bc -l)"
printf 'peak RSS of our server (and qemu-img): %.1f MiB\n' "$(echo "$PEAK / 1024" | bc -l)"
