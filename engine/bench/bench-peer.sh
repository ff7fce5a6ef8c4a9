#!/usr/bin/env bash
# llama.cpp beside q3vl on the same synthetic checkpoint (make bench-peer).
#
# 1. llama.cpp: the source carried by the PyPI sdist llama-cpp-python==$LLAMA_PY_VERSION
#    (vendor/llama.cpp), built once with cmake (-DGGML_NATIVE=ON, Release) into
#    $Q3VL_PEER_DIR (default /tmp/q3vl-peer) and reused by later runs.
# 2. `q3vl synth --size $Q3VL_PEER_SIZE` (2b, 4b or 8b; else $Q3VL_BENCH_SIZE, else 8b: ~17.5 GB) writes
#    a random checkpoint of the real shape, or Q3VL_BENCH_SRC=DIR names an existing one (never deleted).
# 3. q3vl: `convert --mode int8hu`, then `bench --json` (vision, prefill, decode, the decode
#    bound) and `run` on a 448x448 image with one new token (peak RSS of a real answer).
# 4. llama.cpp: its own convert_hf_to_gguf.py writes the text model as q8_0 and the vision
#    projector as f16; `llama-bench` times prefill and decode, `llama-mtmd-cli` encodes the
#    same 448x448 image (its own "image slice encoded in N ms" line) and answers one token.
# Every run uses $Q3VL_PEER_THREADS threads (default 2). The markdown table goes to stdout.
# Big files (source when synthesized, bundles, gguf) live in $Q3VL_BENCH_DIR (default
# /tmp/q3vl-bench-peer) and are deleted at the end unless KEEP=1. Disk: about
# source + max(bundles, gguf), ~28 GB for 8b; KEEP=1 holds all three (~38 GB).
#
# Python for llama.cpp's converter: it needs torch, transformers, numpy (from the oracle venv,
# `make oracle`, the same CPU torch the repo already pins: a PyPI torch wheel pulls ~3 GB of
# CUDA libraries) plus sentencepiece (Qwen's set_vocab imports it before falling back to the
# BPE tokenizer.json). So the peer dir has its own small venv (cmake, ninja, sentencepiece)
# and the converter runs on that venv's interpreter with the oracle's site-packages on
# PYTHONPATH; nothing is installed into the oracle venv. Both venvs come from the same python3.
set -euo pipefail

source "$(dirname "$0")/../../scripts/bench-setup.sh"
LLAMA_PY_VERSION=0.3.36
SIZE=${Q3VL_PEER_SIZE:-${Q3VL_BENCH_SIZE:-8b}}
PEER=${Q3VL_PEER_DIR:-/tmp/q3vl-peer}
THREADS=${Q3VL_PEER_THREADS:-2}
ORACLE_PY=${Q3VL_PEER_TORCH_PY:-$ROOT/oracle/.venv/bin/python}
PROMPT="Describe this image briefly."
DECODE=32   # decode steps timed by both engines
REPS=${Q3VL_BENCH_REPS:-3}   # q3vl bench repetitions (llama-bench makes 5): mean ± sd
SIDE=448    # q3vl's fixed image grid: 448/16 = 28 patches a side, merged 2x2 -> 196 tokens

case "$SIZE" in 2b | 4b | 8b) ;; *) echo "Q3VL_PEER_SIZE must be 2b, 4b or 8b" >&2; exit 2 ;; esac
if [[ ! -x "$ORACLE_PY" ]]; then
  echo "no $ORACLE_PY: run \`make oracle\` first (torch + transformers for llama.cpp's converter)" >&2
  exit 2
fi

bench_setup /tmp/q3vl-bench-peer
mkdir -p "$PEER"

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", b - a }'; }
# Runs a command with its output in a log; on failure shows the log's end and stops.
logged() {
  local log=$1
  shift
  if ! "$@" > "$log" 2>&1; then
    echo "FAILED: $*  (last lines of $log)" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}
# The "Maximum resident set size" of a /usr/bin/time -v report, in bytes.
time_rss() { awk -F': ' '/Maximum resident set size/ { print $2 * 1024 }' "$1"; }
jget() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
gib() { awk -v b="$1" 'BEGIN { printf "%.2f GiB", b / 1073741824 }'; }
gb() { awk -v b="$1" 'BEGIN { printf "%.2f GB", b / 1e9 }'; }

# ---- 1. llama.cpp source and build (cached in $PEER) ---------------------------------------
LSRC="$PEER/llama-cpp-python-$LLAMA_PY_VERSION"
LCPP="$LSRC/vendor/llama.cpp"
BUILD="$PEER/build-$LLAMA_PY_VERSION"
VENV="$PEER/venv"
if [[ ! -f "$LCPP/convert_hf_to_gguf.py" ]]; then
  echo "== fetch llama-cpp-python==$LLAMA_PY_VERSION (sdist) -> $LSRC" >&2
  rm -rf "$PEER/dl" "$LSRC.tmp"
  mkdir -p "$PEER/dl" "$LSRC.tmp"
  # --no-binary for this package only: with `:all:` pip would also build its build
  # dependencies (cmake, ninja) from source just to read the sdist's metadata.
  logged "$PEER/download.log" python3 -m pip download --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_PY_VERSION" -d "$PEER/dl"
  tar xzf "$PEER/dl/llama_cpp_python-$LLAMA_PY_VERSION.tar.gz" -C "$LSRC.tmp" --strip-components=1
  mv "$LSRC.tmp" "$LSRC"
  rm -rf "$PEER/dl"
fi
# The converter is split into conversion/*.py in this version; look in both places.
if ! grep -rqs 'Qwen3VLForConditionalGeneration' "$LCPP/convert_hf_to_gguf.py" "$LCPP/conversion"; then
  echo "this llama.cpp has no Qwen3VLForConditionalGeneration converter: cannot compare" >&2
  exit 1
fi
if [[ ! -x "$VENV/bin/cmake" || ! -x "$VENV/bin/ninja" ]] || ! "$VENV/bin/python" -c 'import sentencepiece' 2> /dev/null; then
  echo "== venv for the build and the converter -> $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  # No cmake on the machine by default: the PyPI wheel brings one, no root needed.
  logged "$PEER/venv.log" "$VENV/bin/pip" install cmake ninja sentencepiece
fi
if [[ ! -x "$BUILD/bin/llama-bench" || ! -x "$BUILD/bin/llama-mtmd-cli" ]]; then
  echo "== build llama.cpp (llama-bench, llama-mtmd-cli; -j2, a while on 2 cores) -> $BUILD" >&2
  t0=$(now)
  logged "$PEER/cmake.log" "$VENV/bin/cmake" -S "$LCPP" -B "$BUILD" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF
  logged "$PEER/build.log" nice -n 10 "$VENV/bin/cmake" --build "$BUILD" -j2 \
    --target llama-bench llama-mtmd-cli
  t1=$(now)
  secs "$t0" "$t1" > "$PEER/build-seconds"
  BUILT="built by this run in $(cat "$PEER/build-seconds") s"
else
  BUILT="cached; built by an earlier run in $(cat "$PEER/build-seconds" 2> /dev/null || echo '?') s"
fi
echo "   llama.cpp: $BUILT" >&2
LCPP_COMMIT=$(sed -n 's/.*ggml commit: *//p' "$PEER/cmake.log" 2> /dev/null | head -1)

# ---- 2. the checkpoint ---------------------------------------------------------------------
SRC="${Q3VL_BENCH_SRC:-$WORK/src}"
if [[ -z "${Q3VL_BENCH_SRC:-}" ]]; then
  echo "== synth $SIZE -> $SRC" >&2
  logged "$WORK/synth.log" "$Q3VL_BIN" synth --size "$SIZE" --out "$SRC" --seed 0
fi
# Drops the source once both conversions are done, if this script wrote it.
drop_src() { if [[ -z "${Q3VL_BENCH_SRC:-}" && "$KEEP" != 1 ]]; then rm -rf "$SRC"; fi; }

# The 448x448 test image: a deterministic RGB pattern, written with the standard library only.
IMG="$WORK/img448.png"
python3 - "$IMG" "$SIDE" << 'PY'
import struct, sys, zlib
path, n = sys.argv[1], int(sys.argv[2])
rows = b"".join(
    b"\0" + bytes(v for x in range(n) for v in (x * 255 // n, y * 255 // n, ((x // 32 + y // 32) % 2) * 200))
    for y in range(n))
def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", n, n, 8, 2, 0, 0, 0))
                       + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
PY

# ---- 3. q3vl -------------------------------------------------------------------------------
echo "== q3vl convert --mode int8hu" >&2
t0=$(now)
logged "$WORK/q3vl-convert.log" /usr/bin/time -v -o "$WORK/q3vl-convert.time" \
  "$Q3VL_BIN" convert --src "$SRC" --out "$WORK/q3vl" --mode int8hu
Q_CONVERT_S=$(secs "$t0" "$(now)")
Q_CONVERT_RSS=$(time_rss "$WORK/q3vl-convert.time")
Q3VL_BYTES=$(du -sb "$WORK/q3vl" | cut -f1)
echo "== q3vl bench (--threads $THREADS --decode-tokens $DECODE)" >&2
/usr/bin/time -v -o "$WORK/q3vl-bench.time" "$Q3VL_BIN" bench --bundle "$WORK/q3vl" --json \
  --threads "$THREADS" --decode-tokens "$DECODE" --reps "$REPS" > "$WORK/q3vl-bench.json" 2> "$WORK/q3vl-bench.log" \
  || { tail -n 40 "$WORK/q3vl-bench.log" >&2; exit 1; }
echo "== q3vl run (image + prompt, 1 new token)" >&2
# --context 4096 like llama-mtmd-cli's -c below: neither engine sizes a KV cache for 256k.
/usr/bin/time -v -o "$WORK/q3vl-run.time" "$Q3VL_BIN" run --bundle "$WORK/q3vl" --image "$IMG" \
  --prompt "$PROMPT" --max-new-tokens 1 --threads "$THREADS" --context 4096 --json \
  > "$WORK/q3vl-run.json" 2> "$WORK/q3vl-run.log" || { tail -n 40 "$WORK/q3vl-run.log" >&2; exit 1; }
Q_PREFILL=$(jget "$WORK/q3vl-bench.json" prefill_tok_s)
Q_PREFILL_SD=$(jget "$WORK/q3vl-bench.json" prefill_tok_s_sd)
Q_DECODE_SD=$(jget "$WORK/q3vl-bench.json" decode_tok_s_sd)
Q_VISION_SD=$(jget "$WORK/q3vl-bench.json" vision_ms_sd)
Q_PROMPT=$(jget "$WORK/q3vl-bench.json" prompt_tokens)
Q_IMGTOK=$(jget "$WORK/q3vl-bench.json" image_tokens)
Q_DECODE=$(jget "$WORK/q3vl-bench.json" decode_tok_s)
Q_VISION=$(jget "$WORK/q3vl-bench.json" vision_ms)
Q_BW=$(jget "$WORK/q3vl-bench.json" bandwidth_gb_s)
Q_BPT=$(jget "$WORK/q3vl-bench.json" decode_bytes_per_token)
Q_BOUND=$(jget "$WORK/q3vl-bench.json" decode_bound_tok_s)
Q_RUN_VISION=$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['timings']['vision_ms'])" "$WORK/q3vl-run.json" 2> /dev/null || echo nan)
Q_BENCH_RSS=$(time_rss "$WORK/q3vl-bench.time")
Q_RUN_RSS=$(time_rss "$WORK/q3vl-run.time")
# The bundles are measured; free their space before the gguf files are written.
if [[ "$KEEP" != 1 ]]; then rm -rf "$WORK/q3vl"; fi

# ---- 4. llama.cpp --------------------------------------------------------------------------
# Same interpreter version in both venvs, or the oracle's compiled packages would not load.
[[ $("$VENV/bin/python" -c 'import sys; print(sys.version_info[:2])') == $("$ORACLE_PY" -c 'import sys; print(sys.version_info[:2])') ]] \
  || { echo "python of $VENV and $ORACLE_PY differ" >&2; exit 1; }
PYSITE=$("$ORACLE_PY" -c 'import site; print(site.getsitepackages()[0])')
CONVERT_GGUF=(env "PYTHONPATH=$PYSITE:$LCPP/gguf-py" nice -n 10 "$VENV/bin/python" "$LCPP/convert_hf_to_gguf.py")
echo "== convert_hf_to_gguf: text q8_0, mmproj f16" >&2
t0=$(now)
logged "$WORK/gguf-text.log" /usr/bin/time -v -o "$WORK/gguf-text.time" \
  "${CONVERT_GGUF[@]}" "$SRC" --outtype q8_0 --outfile "$WORK/text.gguf"
t1=$(now)
logged "$WORK/gguf-mmproj.log" /usr/bin/time -v -o "$WORK/gguf-mmproj.time" \
  "${CONVERT_GGUF[@]}" "$SRC" --mmproj --outtype f16 --outfile "$WORK/mmproj.gguf"
t2=$(now)
L_CONVERT_TEXT_S=$(secs "$t0" "$t1")
L_CONVERT_MMPROJ_S=$(secs "$t1" "$t2")
L_CONVERT_RSS=$(time_rss "$WORK/gguf-text.time")
drop_src
TEXT_BYTES=$(stat -c %s "$WORK/text.gguf")
MMPROJ_BYTES=$(stat -c %s "$WORK/mmproj.gguf")

echo "== llama-bench -p $Q_PROMPT -n $DECODE -t $THREADS" >&2
# The prompt length is q3vl's own benchmark prompt (chat template + 196 image tokens), so both
# engines prefill the same number of tokens (llama-bench's are text tokens, random ids).
LB_CMD=(llama-bench -m text.gguf -p "$Q_PROMPT" -n "$DECODE" -t "$THREADS" -o json)
/usr/bin/time -v -o "$WORK/llama-bench.time" "$BUILD/bin/llama-bench" -m "$WORK/text.gguf" \
  -p "$Q_PROMPT" -n "$DECODE" -t "$THREADS" -o json > "$WORK/llama-bench.json" 2> "$WORK/llama-bench.log" \
  || { tail -n 40 "$WORK/llama-bench.log" >&2; exit 1; }
read -r L_PREFILL L_PREFILL_SD L_DECODE L_DECODE_SD < <(python3 - "$WORK/llama-bench.json" << 'PY'
import json, sys
rows = json.load(open(sys.argv[1]))
pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
tg = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
print(pp["avg_ts"], pp["stddev_ts"], tg["avg_ts"], tg["stddev_ts"])
PY
)
L_BENCH_RSS=$(time_rss "$WORK/llama-bench.time")

echo "== llama-mtmd-cli (image + prompt, 1 new token)" >&2
# -v: the debug log is the only place that shows the image size fed to the encoder and its
# token count; it costs nothing measurable after loading.
MT_CMD=(llama-mtmd-cli -m text.gguf --mmproj mmproj.gguf --image img448.png -p "\"$PROMPT\"" -n 1 -t "$THREADS" -c 4096 --temp 0 -v)
/usr/bin/time -v -o "$WORK/mtmd.time" "$BUILD/bin/llama-mtmd-cli" -m "$WORK/text.gguf" \
  --mmproj "$WORK/mmproj.gguf" --image "$IMG" -p "$PROMPT" -n 1 -t "$THREADS" -c 4096 --temp 0 -v \
  > "$WORK/mtmd.log" 2>&1 < /dev/null || { grep -v 'D create_tensor\|D clip_model_loader\|llama_model_loader: -' "$WORK/mtmd.log" | tail -n 40 >&2; exit 1; }
# The vision encode alone (clip graph, no LM work): tools/mtmd/mtmd-cli.cpp prints
# "mtmd batch encoding done in N ms" around mtmd_batch_encode; older versions' helper printed
# "image slice encoded in N ms" (tools/mtmd/mtmd-helper.cpp, still there for other callers).
L_VISION=$(sed -n -e 's/.*mtmd batch encoding done in \([0-9]*\) ms.*/\1/p' \
  -e 's/.*image slice encoded in \([0-9]*\) ms.*/\1/p' "$WORK/mtmd.log" | head -1)
# mtmd_batch_encode_impl: "encoding batch with 1 entries and total N tokens";
# clip_encode: "copying image 1/1 to input buffer (nx=W, ny=H)" (the size after llama.cpp's resize).
L_IMGTOK=$(sed -n 's/.*encoding batch with .* total \([0-9]*\) tokens.*/\1/p' "$WORK/mtmd.log" | head -1)
L_IMGSIZE=$(sed -n 's/.*copying image .* (nx=\([0-9]*\), ny=\([0-9]*\)).*/\1x\2/p' "$WORK/mtmd.log" | head -1)
L_RUN_RSS=$(time_rss "$WORK/mtmd.time")
[[ -n "$L_VISION" ]] || { echo "no 'mtmd batch encoding done' line in $WORK/mtmd.log" >&2; exit 1; }

# ---- 5. report -----------------------------------------------------------------------------
r() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }
f() { awk -v a="$1" -v d="$2" "BEGIN { printf \"%.${3:-1}f\", a / d }"; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f%%", 100 * a / b }'; }
IMG_NOTE="both $Q_IMGTOK image tokens"
[[ "$L_IMGTOK" == "$Q_IMGTOK" && "$L_IMGSIZE" == "${SIDE}x$SIDE" ]] \
  || IMG_NOTE="llama.cpp resized to ${L_IMGSIZE:-?}, ${L_IMGTOK:-?} image tokens; q3vl $Q_IMGTOK"

cat << REPORT
## llama.cpp beside q3vl ($SIZE shape)

Measured $(date -u +%Y-%m-%dT%H:%MZ) on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores,
$THREADS threads for every run; random-weight checkpoint \`q3vl synth --size $SIZE --seed 0\`.
llama.cpp from llama-cpp-python==$LLAMA_PY_VERSION (vendor/llama.cpp, ggml ${LCPP_COMMIT:-?}), built with
\`-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release\` ($BUILT); its weights: \`convert_hf_to_gguf.py --outtype q8_0\`
(text.gguf, $(gb "$TEXT_BYTES")) and \`--mmproj --outtype f16\` (mmproj.gguf, $(gb "$MMPROJ_BYTES")).
q3vl: \`q3vl convert --mode int8hu\` ($(gb "$Q3VL_BYTES") of bundles).

Commands (in \`$WORK\`, \`engine/bench/bench-peer.sh\`):
- \`${LB_CMD[*]}\`
- \`${MT_CMD[*]}\`
- \`q3vl bench --bundle q3vl --json --threads $THREADS --decode-tokens $DECODE --reps $REPS\`
- \`q3vl run --bundle q3vl --image img448.png --prompt "$PROMPT" --max-new-tokens 1 --threads $THREADS --context 4096\`

Ratio: >1 means q3vl is better (q3vl/llama.cpp for rates, llama.cpp/q3vl for times and memory).

| what | llama.cpp | q3vl | ratio |
|---|---|---|---|
| prefill tok/s ($Q_PROMPT tokens) | $(f "$L_PREFILL" 1 2) ± $(f "$L_PREFILL_SD" 1 2) (pp$Q_PROMPT, text tokens) | $(f "$Q_PREFILL" 1 2) ± $(f "$Q_PREFILL_SD" 1 2) ($Q_PROMPT tokens, $Q_IMGTOK of them image) | $(r "$Q_PREFILL" "$L_PREFILL") |
| decode tok/s | $(f "$L_DECODE" 1 3) ± $(f "$L_DECODE_SD" 1 3) (tg$DECODE, empty context) | $(f "$Q_DECODE" 1 3) ± $(f "$Q_DECODE_SD" 1 3) ($DECODE steps after the $Q_PROMPT-token prompt) | $(r "$Q_DECODE" "$L_DECODE") |
| decode / bound ($(f "$Q_BOUND" 1 3) tok/s) | $(pct "$L_DECODE" "$Q_BOUND") | $(pct "$Q_DECODE" "$Q_BOUND") | |
| vision encode ms (${SIDE}², $IMG_NOTE) | $L_VISION | $(f "$Q_VISION" 1 0) ± $(f "$Q_VISION_SD" 1 0) (\`run\`: $(f "$Q_RUN_VISION" 1 0)) | $(r "$L_VISION" "$Q_VISION") |
| peak RSS, image + prompt + 1 token (mtmd-cli / q3vl run) | $(gib "$L_RUN_RSS") | $(gib "$Q_RUN_RSS") | $(r "$L_RUN_RSS" "$Q_RUN_RSS") |
| peak RSS, benchmark (llama-bench: text only / q3vl bench: vision + text) | $(gib "$L_BENCH_RSS") | $(gib "$Q_BENCH_RSS") | $(r "$L_BENCH_RSS" "$Q_BENCH_RSS") |
| conversion wall s (one after the other; page cache not dropped) | $L_CONVERT_TEXT_S text + $L_CONVERT_MMPROJ_S mmproj | $Q_CONVERT_S (both bundles, checksums) | $(r "$((L_CONVERT_TEXT_S + L_CONVERT_MMPROJ_S))" "$Q_CONVERT_S") |
| conversion peak RSS | $(gib "$L_CONVERT_RSS") (text) | $(gib "$Q_CONVERT_RSS") | $(r "$L_CONVERT_RSS" "$Q_CONVERT_RSS") |
| weights on disk | $(gb $((TEXT_BYTES + MMPROJ_BYTES))) (q8_0 text + f16 mmproj) | $(gb "$Q3VL_BYTES") (int8hu) | |

Decode bound (from \`q3vl bench\`): memory read bandwidth $(f "$Q_BW" 1 2) GB/s / $(gb "$Q_BPT") read per
decode step by q3vl = $(f "$Q_BOUND" 1 3) tok/s, used for both engines (llama.cpp reads its q8_0 text.gguf,
$(gb "$TEXT_BYTES"), per step, less the token-embedding table when the head is untied). Peak RSS is /usr/bin/time's maximum resident set
(mapped weight pages count); \`q3vl bench\`'s also holds its ${SIDE}² image pass and bandwidth test buffer.
Load average after the runs: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine competes for the cores).
REPORT
