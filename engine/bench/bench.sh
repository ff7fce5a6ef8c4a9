#!/usr/bin/env bash
# Engine benchmark on the Qwen3-VL-8B shape: synthesize a random-weight 8B checkpoint
# (~17 GB), convert it to int8hu, run `q3vl bench`, write the table into BENCHMARKS.md
# (section "Engine (8B shape)") and delete the scratch folder.
#
# Usage: engine/bench/bench.sh [path/to/q3vl]   (default: target/release/q3vl)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
q3vl="${1:-$root/target/release/q3vl}"
work=/tmp/q3vl-bench8b
trap 'rm -rf "$work"' EXIT
rm -rf "$work"
mkdir -p "$work"

"$q3vl" synth --size 8b --out "$work/src"
"$q3vl" convert --src "$work/src" --out "$work/out" --mode int8hu
rm -rf "$work/src"   # free the disk before measuring
cmd="q3vl bench --bundle $work/out"
table="$("$q3vl" bench --bundle "$work/out" 2>&1)"
json="$("$q3vl" bench --bundle "$work/out" --json --decode-tokens 8 2>/dev/null)"

bench_md="$root/BENCHMARKS.md"
section="$(mktemp)"
{
  echo "## Engine (8B shape)"
  echo
  echo "Measured $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs)),"
  echo "random-weight 8B-shape checkpoint (\`q3vl synth --size 8b\`) converted to int8hu."
  echo "The decode bound is the memory bandwidth measured in the same run divided by the"
  echo "bytes one decode step reads (every weight once, one embedding row, the KV cache)."
  echo
  echo "Command: \`$cmd\`"
  echo
  echo '```'
  echo "$table"
  echo '```'
  echo
  echo "Second run, \`--json --decode-tokens 8\`:"
  echo
  echo '```json'
  echo "$json"
  echo '```'
} > "$section"
# Replace an earlier "Engine (8B shape)" section, keep everything else.
if [ -f "$bench_md" ]; then
  awk -v f="$section" '
    /^## Engine \(8B shape\)/ { skip = 1; while ((getline l < f) > 0) print l; next }
    /^## / && skip { skip = 0 }
    !skip { print }
  ' "$bench_md" > "$bench_md.tmp"
  grep -q '^## Engine (8B shape)' "$bench_md.tmp" || { echo; cat "$section"; } >> "$bench_md.tmp"
  mv "$bench_md.tmp" "$bench_md"
else
  { echo "# Benchmarks"; echo; cat "$section"; } > "$bench_md"
fi
rm -f "$section"
echo "wrote $bench_md"
