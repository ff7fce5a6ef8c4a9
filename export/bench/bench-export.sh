#!/usr/bin/env bash
# Export benchmark on the 8B shape (make bench-export).
#
# 1. `q3vl synth --size 8b` (or Q3VL_BENCH_SRC), then `q3vl convert` (int8hu, untimed).
# 2. Q3VL_EXPORT_ROUNDS rounds (default 2), each measuring, for every format of
#    Q3VL_EXPORT_FORMATS (default "compressed-tensors gguf") in turn: the read floor (cat of
#    both bundles from a cold page cache), `q3vl export FORMAT` from a cold page cache (wall,
#    peak RSS from its own VmHWM and /usr/bin/time -v), and the write floor (dd of the
#    export's byte count with fsync). Each ratio is export / (read + write), from figures
#    taken minutes apart at most: this host's disk drifts.
# Targets: peak RSS <= 2 GiB. Needs ~40 GB free in the work folder, deleted at the end
# (KEEP=1 keeps it). Dropping caches needs root; without it the figures say so.
set -euo pipefail

source "$(dirname "$0")/../../scripts/bench-setup.sh"
bench_setup /tmp/q3vl-bench-export

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
drop_caches() {
  sync
  if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then COLD=yes; else COLD="no (not root?)"; fi
}

SRC="${Q3VL_BENCH_SRC:-$WORK/src}"
if [[ -z "${Q3VL_BENCH_SRC:-}" ]]; then
  echo "== synth 8b -> $SRC" >&2
  "$Q3VL_BIN" synth --size 8b --out "$SRC" --seed 0 > /dev/null
fi
echo "== convert (int8hu)" >&2
"$Q3VL_BIN" convert --src "$SRC" --out "$WORK/bundles" > /dev/null
IN_BYTES=$(du -cb "$WORK"/bundles/*/*.safetensors | tail -1 | cut -f1)

ROUNDS="${Q3VL_EXPORT_ROUNDS:-2}"
FORMATS="${Q3VL_EXPORT_FORMATS:-compressed-tensors gguf}"
ROWS=""
for r in $(seq 1 "$ROUNDS"); do
  for fmt in $FORMATS; do
    echo "== round $r, $fmt: read floor, export, write floor" >&2
    drop_caches
    t0=$(now); cat "$WORK"/bundles/*/*.safetensors > /dev/null; t1=$(now)
    READ_S=$(secs "$t0" "$t1")
    rm -rf "$WORK/export"
    drop_caches
    t0=$(now)
    /usr/bin/time -v -o "$WORK/time.txt" "$Q3VL_BIN" export "$fmt" \
      --bundle "$WORK/bundles" --out "$WORK/export" --allow-unverified --json > "$WORK/export.json" 2>/dev/null
    t1=$(now)
    EXPORT_S=$(secs "$t0" "$t1")
    OUT_BYTES=$(du -cb "$WORK"/export/* | tail -1 | cut -f1)
    HWM=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['peak_rss_bytes'])" "$WORK/export.json")
    TIME_RSS_KB=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time.txt")
    CPU_S=$(awk -F': ' '/User time/ {u=$2} /System time/ {s=$2} END { printf "%.1f", u + s }' "$WORK/time.txt")
    BLOCKS=$(( (OUT_BYTES + 16777215) / 16777216 ))
    t0=$(now); dd if=/dev/zero of="$WORK/ddtest" bs=16M count="$BLOCKS" conv=fsync status=none; t1=$(now)
    WRITE_S=$(secs "$t0" "$t1")
    rm -f "$WORK/ddtest"
    ROWS+="| $r | $fmt | $(awk -v b="$OUT_BYTES" 'BEGIN { printf "%.2f GB", b / 1e9 }') | $READ_S s | $WRITE_S s | $EXPORT_S s | $(awk -v e="$EXPORT_S" -v r="$READ_S" -v w="$WRITE_S" 'BEGIN { printf "%.2fx", e / (r + w) }') | $(awk -v h="$HWM" 'BEGIN { printf "%.3f", h / 1073741824 }') GiB ($(awk -v k="$TIME_RSS_KB" 'BEGIN { printf "%.3f", k / 1048576 }') by time -v) | $CPU_S s |
"
  done
done

cat <<REPORT
## Export (8B shape)

Command: \`q3vl export FORMAT --bundle $WORK/bundles --out $WORK/export --allow-unverified\`
($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores; cold page cache: $COLD;
\`export/bench/bench-export.sh\`). Bundles read: $(awk -v b="$IN_BYTES" 'BEGIN { printf "%.2f GB", b / 1e9 }') of safetensors.

| round | format | written | read floor (cat, cold) | write floor (dd + fsync) | export wall | export / floor | peak RSS | CPU |
|---|---|---|---|---|---|---|---|---|
$ROWS
REPORT
