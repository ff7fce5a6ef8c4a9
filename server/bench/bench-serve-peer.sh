#!/usr/bin/env bash
# q3vl serve beside llama.cpp's llama-server on one synthetic checkpoint (make bench-serve).
#
# 1. llama.cpp as `make bench-peer` builds it (scripts/llama-cpp.sh; llama-server included).
# 2. `q3vl synth --size $Q3VL_SERVE_SIZE` (default 8b) writes a random checkpoint of the real
#    shape, or Q3VL_BENCH_SRC=DIR names an existing one (never deleted).
# 3. Both conversions: `q3vl convert --mode int8hu`; llama.cpp's convert_hf_to_gguf.py, text
#    q8_0 and projector f16 (as bench-peer).
# 4. $Q3VL_SERVE_ROUNDS (default 2) interleaved rounds; each starts one server, measures it
#    with scripts/bench_serve.py, stops it, then the other (the order alternating by round):
#    time to first token for a 448x448 image prompt (another image each time, so no cache
#    helps), then aggregate decode tokens/s with 1, 2, 4 and 8 concurrent greedy streams.
#    Both servers get $Q3VL_SERVE_THREADS threads (default 2) and 8 parallel slots with
#    continuous batching (llama-server: -np 8 -cb; q3vl: --parallel 8).
# The markdown table goes to stdout. Big files live in $Q3VL_BENCH_DIR (default
# /tmp/q3vl-bench-serve), deleted at the end unless KEEP=1 (~20 GB for 8b after conversion).
# Python: the converter runs as in bench-peer (oracle venv's torch on PYTHONPATH).
set -euo pipefail

source "$(dirname "$0")/../../scripts/bench-setup.sh"
source "$ROOT/scripts/llama-cpp.sh"
SIZE=${Q3VL_SERVE_SIZE:-8b}
PEER=${Q3VL_PEER_DIR:-/tmp/q3vl-peer}
THREADS=${Q3VL_SERVE_THREADS:-2}
ROUNDS=${Q3VL_SERVE_ROUNDS:-2}
TOKENS=${Q3VL_SERVE_TOKENS:-48}
ORACLE_PY=${Q3VL_PEER_TORCH_PY:-$ROOT/oracle/.venv/bin/python}
PORT=${Q3VL_SERVE_PORT:-18480}

case "$SIZE" in 2b | 4b | 8b) ;; *) echo "Q3VL_SERVE_SIZE must be 2b, 4b or 8b" >&2; exit 2 ;; esac
if [[ ! -x "$ORACLE_PY" ]]; then
  echo "no $ORACLE_PY: run \`make oracle\` first (torch + transformers for llama.cpp's converter)" >&2
  exit 2
fi
bench_setup /tmp/q3vl-bench-serve
logged() { llama_cpp_logged "$@" || exit 1; }
llama_cpp_setup

SRC="${Q3VL_BENCH_SRC:-$WORK/src}"
if [[ -z "${Q3VL_BENCH_SRC:-}" ]]; then
  echo "== synth $SIZE -> $SRC" >&2
  logged "$WORK/synth.log" "$Q3VL_BIN" synth --size "$SIZE" --out "$SRC" --seed 0
fi
echo "== q3vl convert --mode int8hu" >&2
logged "$WORK/q3vl-convert.log" "$Q3VL_BIN" convert --src "$SRC" --out "$WORK/q3vl" --mode int8hu
PYSITE=$("$ORACLE_PY" -c 'import site; print(site.getsitepackages()[0])')
CONVERT_GGUF=(env "PYTHONPATH=$PYSITE:$LCPP/gguf-py" nice -n 10 "$VENV/bin/python" "$LCPP/convert_hf_to_gguf.py")
echo "== convert_hf_to_gguf: text q8_0, mmproj f16" >&2
logged "$WORK/gguf-text.log" "${CONVERT_GGUF[@]}" "$SRC" --outtype q8_0 --outfile "$WORK/text.gguf"
logged "$WORK/gguf-mmproj.log" "${CONVERT_GGUF[@]}" "$SRC" --mmproj --outtype f16 --outfile "$WORK/mmproj.gguf"
if [[ -z "${Q3VL_BENCH_SRC:-}" && "$KEEP" != 1 ]]; then rm -rf "$SRC"; fi
# Both servers' first load reads its weights afresh (scripts/bench-setup.sh).
evict_page_cache "$WORK/q3vl" "$WORK/text.gguf" "$WORK/mmproj.gguf"

# Waits until the server answers /health (model loaded), at most 10 minutes.
wait_healthy() {
  local pid=$1
  for _ in $(seq 1200); do
    if curl -sf "http://127.0.0.1:$PORT/health" > /dev/null 2>&1; then return 0; fi
    kill -0 "$pid" 2> /dev/null || { echo "the server exited while loading" >&2; return 1; }
    sleep 0.5
  done
  echo "the server did not come up" >&2
  return 1
}
# measure NAME ROUND LOG CMD...: starts the server, measures it, stops it.
measure() {
  local name=$1 r=$2 log=$3
  shift 3
  echo "== round $r: $name" >&2
  "$@" > "$log" 2>&1 &
  local pid=$!
  wait_healthy "$pid" || { tail -n 30 "$log" >&2; exit 1; }
  python3 "$ROOT/scripts/bench_serve.py" --port "$PORT" --model bench --tokens "$TOKENS" \
    --variant $((10 * r)) > "$WORK/$name.$r.json" || { tail -n 30 "$log" >&2; exit 1; }
  kill "$pid"
  wait "$pid" 2> /dev/null || true
}
q3vl_round() {
  measure q3vl "$1" "$WORK/q3vl-serve.$1.log" "$Q3VL_BIN" serve --bundle "$WORK/q3vl" --port "$PORT" \
    --model-name bench --parallel 8 --context 2048 --threads "$THREADS" --allow-unverified
}
llama_round() {
  measure llama "$1" "$WORK/llama-server.$1.log" "$BUILD/bin/llama-server" -m "$WORK/text.gguf" \
    --mmproj "$WORK/mmproj.gguf" --port "$PORT" --host 127.0.0.1 -t "$THREADS" -tb "$THREADS" \
    -np 8 -cb -c 16384 --jinja --no-warmup
}
STARTED=$(date -u +%Y-%m-%dT%H:%MZ)
for ((r = 1; r <= ROUNDS; r++)); do
  if ((r % 2 == 1)); then q3vl_round "$r"; llama_round "$r"; else llama_round "$r"; q3vl_round "$r"; fi
done

CPU=$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)
python3 - "$WORK" "$ROUNDS" "$SIZE" "$CPU" "$STARTED" "$THREADS" "$TOKENS" "$LCPP_COMMIT" << 'PY'
import json, statistics, sys
work, rounds, size, cpu, started, threads, tokens, commit = sys.argv[1:]
rounds = int(rounds)
load = lambda n, r: json.load(open(f"{work}/{n}.{r}.json"))
q = [load("q3vl", r) for r in range(1, rounds + 1)]
l = [load("llama", r) for r in range(1, rounds + 1)]
rng = lambda v: f"{min(v):.2f}–{max(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"
med = statistics.median
print(f"q3vl serve vs llama-server, synthetic {size}, {cpu}, {threads} threads, {rounds} interleaved rounds, "
      f"started {started}; llama.cpp ggml {commit}; {tokens} greedy tokens per stream.\n")
print("| | q3vl serve (int8hu) | llama-server (Q8_0) | ratio (median, range) |")
print("|---|---|---|---|")
qt = [x["ttft"]["median_s"] for x in q]
lt = [x["ttft"]["median_s"] for x in l]
ratios = [b / a for a, b in zip(qt, lt)]
print(f"| time to first token, 448² image | {rng(qt)} s | {rng(lt)} s | {med(ratios):.2f}× ({rng(ratios)}) faster |")
for i, d in enumerate(q[0]["decode"]):
    n = d["streams"]
    qd = [x["decode"][i]["tok_s"] for x in q]
    ld = [x["decode"][i]["tok_s"] for x in l]
    rr = [a / b for a, b in zip(qd, ld)]
    print(f"| decode, {n} stream{'s' if n > 1 else ''} (aggregate tok/s) | {rng(qd)} | {rng(ld)} | {med(rr):.2f}× ({rng(rr)}) |")
one = [x["decode"][0]["tok_s"] for x in q]
for i, d in enumerate(q[0]["decode"][1:], 1):
    s = [x["decode"][i]["tok_s"] / o for x, o in zip(q, one)]
    print(f"\nq3vl, {d['streams']} streams over 1: {med(s):.2f}× ({rng(s)})", end="")
print()
PY
