#!/usr/bin/env bash
# Conversion benchmark on the 8B shape (make bench-convert).
#
# 1. `q3vl synth --size 8b` writes a ~17.5 GB random checkpoint of the real shape.
# 2. The I/O floor, measured in the same run: the time to read the source shards once
#    from a cold page cache (cat > /dev/null after dropping caches), plus the time to
#    write the output's byte count and fsync it (dd conv=fsync).
# 3. `q3vl convert` from a cold page cache: wall time, and peak RSS both from the
#    converter's own VmHWM and from /usr/bin/time -v.
# Targets: peak RSS <= 2 GiB, wall <= 1.25 x floor. Needs ~30 GB free in the work
# folder (source + output, then source + the write test), which is deleted at the end (KEEP=1 keeps it).
# Q3VL_BENCH_SRC=DIR reuses an existing `synth --size 8b` checkpoint instead of writing one (it is
# never deleted). Dropping caches needs root; without it the figures are printed with a warning.
set -euo pipefail

source "$(dirname "$0")/../../scripts/bench-setup.sh"
bench_setup /tmp/q3vl-bench

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
drop_caches() {
  sync
  if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
    COLD=yes
  else
    COLD="no (cannot drop caches: not root?)"
  fi
}

SRC="${Q3VL_BENCH_SRC:-$WORK/src}"
if [[ -z "${Q3VL_BENCH_SRC:-}" ]]; then
  echo "== synth 8b -> $SRC" >&2
  t0=$(now)
  "$Q3VL_BIN" synth --size 8b --out "$SRC" --seed 0 --json > "$WORK/synth.json"
  t1=$(now)
  echo "   $(secs "$t0" "$t1") s" >&2
fi
SRC_BYTES=$(du -cb "$SRC"/*.safetensors | tail -1 | cut -f1)
echo "   source: $SRC_BYTES bytes of shards" >&2

echo "== read floor (cold cache)" >&2
drop_caches
t0=$(now)
cat "$SRC"/*.safetensors > /dev/null
t1=$(now)
READ_S=$(secs "$t0" "$t1")

echo "== convert (cold cache)" >&2
drop_caches
t0=$(now)
/usr/bin/time -v -o "$WORK/time.txt" \
  "$Q3VL_BIN" convert --src "$SRC" --out "$WORK/out" --json > "$WORK/convert.json"
t1=$(now)
CONVERT_S=$(secs "$t0" "$t1")
OUT_BYTES=$(du -cb "$WORK"/out/*/* "$WORK"/out/*/tokenizer/* 2>/dev/null | tail -1 | cut -f1)
TIME_RSS_KB=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time.txt")
CPU_S=$(awk -F': ' '/User time/ {u=$2} /System time/ {s=$2} END { printf "%.1f s (user %.1f + sys %.1f)", u + s, u, s }' "$WORK/time.txt")
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
HWM=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['peak_rss_bytes'])" "$WORK/convert.json")

# The bundles are measured; free their space before the write test.
rm -rf "$WORK/out"

echo "== write floor: $OUT_BYTES bytes + fsync" >&2
BLOCKS=$(( (OUT_BYTES + 16777215) / 16777216 ))
t0=$(now)
dd if=/dev/zero of="$WORK/ddtest" bs=16M count="$BLOCKS" conv=fsync status=none
t1=$(now)
WRITE_S=$(secs "$t0" "$t1")
rm -f "$WORK/ddtest"

FLOOR_S=$(awk -v r="$READ_S" -v w="$WRITE_S" 'BEGIN { printf "%.1f", r + w }')
RATIO=$(awk -v c="$CONVERT_S" -v f="$FLOOR_S" 'BEGIN { printf "%.2f", c / f }')
RSS_GIB=$(awk -v h="$HWM" 'BEGIN { printf "%.2f", h / 1073741824 }')
TIME_RSS_GIB=$(awk -v k="$TIME_RSS_KB" 'BEGIN { printf "%.2f", k / 1048576 }')

cat <<REPORT
## Conversion (8B shape)

Command: \`q3vl synth --size 8b --out $SRC && q3vl convert --src $SRC --out $WORK/out\`
(mode int8hu, $(nproc) cores, cold page cache: $COLD; \`convert/bench/bench-convert.sh\`)

| what | value |
|---|---|
| source (bf16 shards) | $(awk -v b="$SRC_BYTES" 'BEGIN { printf "%.2f GB", b / 1e9 }') |
| output (both bundles) | $(awk -v b="$OUT_BYTES" 'BEGIN { printf "%.2f GB", b / 1e9 }') |
| read floor (cat shards, cold) | $READ_S s |
| write floor (dd output bytes, fsync) | $WRITE_S s |
| **I/O floor** (read + write) | **$FLOOR_S s** |
| **convert wall** | **$CONVERT_S s** (**${RATIO}x** the floor; target <= 1.25x) |
| **peak RSS** (VmHWM) | **$RSS_GIB GiB** (target <= 2 GiB); /usr/bin/time: $TIME_RSS_GIB GiB |
| convert CPU time | $CPU_S |
| load average after the run | $LOAD (other work on the machine competes for the 2 cores) |
REPORT
