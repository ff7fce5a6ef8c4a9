#!/usr/bin/env bash
# llama.cpp on q3vl's GGUF beside llama.cpp on its own Q8_0 conversion (make bench-gguf).
#
# 1. llama.cpp built as `make llama-cpp` builds it (scripts/llama-cpp.sh, cached).
# 2. `q3vl synth --size 8b` (or Q3VL_BENCH_SRC), `q3vl convert` (int8hu), then both GGUFs
#    of the same checkpoint, each timed: `q3vl export gguf` and llama.cpp's
#    `convert_hf_to_gguf.py --outtype q8_0` (text only: llama-bench runs text).
# 3. $Q3VL_GGUF_ROUNDS (default 3) interleaved rounds, each running `llama-bench -p P -n 32`
#    on both files back to back (q3vl's first in odd rounds, llama.cpp's first in even
#    ones): this host drifts within minutes, so each ratio comes from one round.
# Target: the same speed (the files hold the same Q8_0 blocks bar rounding, and the same
# types bar token_embd, F16 in q3vl's, which llama.cpp only reads by row).
# Needs `make oracle` (torch for the converter) and ~45 GB free in $Q3VL_BENCH_DIR
# (default /tmp/q3vl-bench-gguf), deleted at the end unless KEEP=1.
set -euo pipefail

source "$(dirname "$0")/../../scripts/bench-setup.sh"
source "$ROOT/scripts/llama-cpp.sh"
PEER=${Q3VL_PEER_DIR:-/tmp/q3vl-peer}
THREADS=${Q3VL_PEER_THREADS:-2}
ROUNDS=${Q3VL_GGUF_ROUNDS:-3}
PROMPT=${Q3VL_GGUF_PROMPT:-211}   # q3vl bench's 448x448 image prompt length
DECODE=32
ORACLE_PY=${Q3VL_PEER_TORCH_PY:-$ROOT/oracle/.venv/bin/python}
[[ -x "$ORACLE_PY" ]] || { echo "no $ORACLE_PY: run \`make oracle\` first (torch for llama.cpp's converter)" >&2; exit 2; }

bench_setup /tmp/q3vl-bench-gguf
mkdir -p "$PEER"
logged() { llama_cpp_logged "$@" || exit 1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", b - a }'; }
llama_cpp_setup

SRC="${Q3VL_BENCH_SRC:-$WORK/src}"
if [[ -z "${Q3VL_BENCH_SRC:-}" ]]; then
  echo "== synth 8b -> $SRC" >&2
  logged "$WORK/synth.log" "$Q3VL_BIN" synth --size 8b --out "$SRC" --seed 0
fi
echo "== q3vl convert (int8hu), export gguf" >&2
logged "$WORK/convert.log" "$Q3VL_BIN" convert --src "$SRC" --out "$WORK/bundles"
t0=$(now)
logged "$WORK/export.log" /usr/bin/time -v -o "$WORK/export.time" \
  "$Q3VL_BIN" export gguf --bundle "$WORK/bundles" --out "$WORK/ours" --allow-unverified
EXPORT_S=$(secs "$t0" "$(now)")
OURS=$(ls "$WORK"/ours/*-Q8_0.gguf)
PYSITE=$("$ORACLE_PY" -c 'import site; print(site.getsitepackages()[0])')
echo "== convert_hf_to_gguf --outtype q8_0" >&2
t0=$(now)
logged "$WORK/theirs.log" /usr/bin/time -v -o "$WORK/theirs.time" \
  env "PYTHONPATH=$PYSITE:$LCPP/gguf-py" "$VENV/bin/python" "$LCPP/convert_hf_to_gguf.py" \
  "$SRC" --outtype q8_0 --outfile "$WORK/theirs-Q8_0.gguf"
THEIRS_S=$(secs "$t0" "$(now)")
THEIRS="$WORK/theirs-Q8_0.gguf"
if [[ -z "${Q3VL_BENCH_SRC:-}" && "$KEEP" != 1 ]]; then rm -rf "$SRC"; fi
rss() { awk -F': ' '/Maximum resident set size/ { printf "%.2f GiB", $2 / 1048576 }' "$1"; }

bench() {
  local who=$1 file=$2 r=$3
  echo "== round $r: llama-bench on $who's file" >&2
  "$BUILD/bin/llama-bench" -m "$file" -p "$PROMPT" -n "$DECODE" -t "$THREADS" -r 1 -o json \
    > "$WORK/$who.$r.json" 2> "$WORK/$who.$r.log" || { tail -n 30 "$WORK/$who.$r.log" >&2; exit 1; }
}
STARTED=$(date -u +%Y-%m-%dT%H:%MZ)
for ((r = 1; r <= ROUNDS; r++)); do
  if ((r % 2 == 1)); then bench ours "$OURS" "$r"; bench theirs "$THEIRS" "$r"
  else bench theirs "$THEIRS" "$r"; bench ours "$OURS" "$r"; fi
done

cat <<REPORT
## llama.cpp on q3vl's GGUF and on its own Q8_0 (8B shape)

Measured from $STARTED to $(date -u +%H:%MZ) on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores,
$THREADS threads; \`export/bench/bench-gguf-peer.sh\` (\`make bench-gguf\`), llama.cpp of llama-cpp-python
$LLAMA_PY_VERSION. Files: \`q3vl export gguf\` of the int8hu bundles ($(basename "$OURS"), $(du -h "$OURS" | cut -f1),
$EXPORT_S s, peak RSS $(rss "$WORK/export.time")) and \`convert_hf_to_gguf.py --outtype q8_0\` of the same
synthetic checkpoint ($(du -h "$THEIRS" | cut -f1), $THEIRS_S s, peak RSS $(rss "$WORK/theirs.time")).
Each round: \`llama-bench -m FILE -p $PROMPT -n $DECODE -t $THREADS -r 1\` on both, back to back.

REPORT
python3 - "$WORK" "$ROUNDS" << 'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
def speeds(who, r):
    rows = json.load(open(f"{work}/{who}.{r}.json"))
    pp = next(x for x in rows if x["n_prompt"] > 0 and x["n_gen"] == 0)["avg_ts"]
    tg = next(x for x in rows if x["n_gen"] > 0 and x["n_prompt"] == 0)["avg_ts"]
    return pp, tg
print("| round | prefill tok/s, q3vl's file / llama.cpp's | ratio | decode tok/s, q3vl's file / llama.cpp's | ratio |")
print("|---|---|---|---|---|")
rp, rd = [], []
for r in range(1, rounds + 1):
    (op, od), (tp, td) = speeds("ours", r), speeds("theirs", r)
    rp.append(op / tp); rd.append(od / td)
    print(f"| {r} | {op:.2f} / {tp:.2f} | {op / tp:.3f} | {od:.3f} / {td:.3f} | {od / td:.3f} |")
print(f"| median | | {statistics.median(rp):.3f} ({min(rp):.3f}–{max(rp):.3f}) | | {statistics.median(rd):.3f} ({min(rd):.3f}–{max(rd):.3f}) |")
PY
