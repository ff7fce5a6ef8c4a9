#!/usr/bin/env bash
# llama.cpp beside q3vl on the same synthetic checkpoint (make bench-peer).
#
# 1. llama.cpp: the source carried by the PyPI sdist llama-cpp-python==$LLAMA_PY_VERSION
#    (vendor/llama.cpp), built once with cmake (-DGGML_NATIVE=ON, Release) into
#    $Q3VL_PEER_DIR (default /tmp/q3vl-peer) and reused by later runs.
# 2. `q3vl synth --size $Q3VL_PEER_SIZE` (2b, 4b or 8b; else $Q3VL_BENCH_SIZE, else 8b: ~17.5 GB) writes
#    a random checkpoint of the real shape, or Q3VL_BENCH_SRC=DIR names an existing one (never deleted).
# 3. Both conversions: `q3vl convert --mode int8hu`; llama.cpp's own convert_hf_to_gguf.py
#    writes the text model as q8_0 and the vision projector as f16.
#    Then both engines' files leave the page cache (evict_page_cache), so that neither maps the
#    small page-cache folios its converter's writes left.
# 4. $Q3VL_PEER_ROUNDS (default 3) interleaved rounds, each measuring both engines back to back:
#    `q3vl bench --json` (vision, prefill, decode, the decode bound, the instruction peaks) and
#    `q3vl run` on a 448x448 image with one new token (vision time, time to the first token,
#    peak RSS of a real answer); `llama-bench` (prefill, decode) and `llama-mtmd-cli` on the
#    same image (its own "mtmd batch encoding done in N ms" line, and its prompt eval time,
#    which spans the encode and is its time to the first token; one new token). Every ratio
#    comes from one round.
# Every run uses $Q3VL_PEER_THREADS threads (default 2). The markdown table goes to stdout.
# Big files (source when synthesized, bundles, gguf) live in $Q3VL_BENCH_DIR (default
# /tmp/q3vl-bench-peer) and are deleted at the end unless KEEP=1. Disk: source + bundles +
# gguf while converting (~38 GB for 8b), then bundles + gguf (~20 GB).
#
# Python for llama.cpp's converter: it needs torch, transformers, numpy (from the oracle venv,
# `make oracle`, the same CPU torch the repo already pins: a PyPI torch wheel pulls ~3 GB of
# CUDA libraries) plus sentencepiece (Qwen's set_vocab imports it before falling back to the
# BPE tokenizer.json). So the peer dir has its own small venv (cmake, ninja, sentencepiece)
# and the converter runs on that venv's interpreter with the oracle's site-packages on
# PYTHONPATH; nothing is installed into the oracle venv. Both venvs come from the same python3.
set -euo pipefail

source "$(dirname "$0")/../../scripts/bench-setup.sh"
source "$ROOT/scripts/llama-cpp.sh"
SIZE=${Q3VL_PEER_SIZE:-${Q3VL_BENCH_SIZE:-8b}}
PEER=${Q3VL_PEER_DIR:-/tmp/q3vl-peer}
THREADS=${Q3VL_PEER_THREADS:-2}
ORACLE_PY=${Q3VL_PEER_TORCH_PY:-$ROOT/oracle/.venv/bin/python}
PROMPT="Describe this image briefly."
DECODE=32   # decode steps timed by both engines
ROUNDS=${Q3VL_PEER_ROUNDS:-3}   # interleaved rounds of both engines (section 4)
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
logged() { llama_cpp_logged "$@" || exit 1; }
# The "Maximum resident set size" of a /usr/bin/time -v report, in bytes.
time_rss() { awk -F': ' '/Maximum resident set size/ { print $2 * 1024 }' "$1"; }
jget() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
gib() { awk -v b="$1" 'BEGIN { printf "%.2f GiB", b / 1073741824 }'; }
gb() { awk -v b="$1" 'BEGIN { printf "%.2f GB", b / 1e9 }'; }

# ---- 1. llama.cpp source and build (cached in $PEER; scripts/llama-cpp.sh) ----------------
llama_cpp_setup

# ---- 2. the checkpoint ---------------------------------------------------------------------
SRC="${Q3VL_BENCH_SRC:-$WORK/src}"
if [[ -z "${Q3VL_BENCH_SRC:-}" ]]; then
  echo "== synth $SIZE -> $SRC" >&2
  logged "$WORK/synth.log" "$Q3VL_BIN" synth --size "$SIZE" --out "$SRC" --seed 0
fi
# Drops the source once both conversions are done, if this script wrote it.
drop_src() { if [[ -z "${Q3VL_BENCH_SRC:-}" && "$KEEP" != 1 ]]; then rm -rf "$SRC"; fi; }

# The 448x448 test image (scripts/bench-setup.sh).
IMG="$WORK/img448.png"
write_test_png "$IMG" "$SIDE"

# ---- 3. conversions ------------------------------------------------------------------------
echo "== q3vl convert --mode int8hu" >&2
t0=$(now)
logged "$WORK/q3vl-convert.log" /usr/bin/time -v -o "$WORK/q3vl-convert.time" \
  "$Q3VL_BIN" convert --src "$SRC" --out "$WORK/q3vl" --mode int8hu
Q_CONVERT_S=$(secs "$t0" "$(now)")
Q_CONVERT_RSS=$(time_rss "$WORK/q3vl-convert.time")
Q3VL_BYTES=$(du -sb "$WORK/q3vl" | cut -f1)

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
# Both engines' first load reads its weights afresh (scripts/bench-setup.sh).
evict_page_cache "$WORK/q3vl" "$WORK/text.gguf" "$WORK/mmproj.gguf"
TEXT_BYTES=$(stat -c %s "$WORK/text.gguf")
MMPROJ_BYTES=$(stat -c %s "$WORK/mmproj.gguf")

# ---- 4. interleaved rounds -------------------------------------------------------------------
# This host's speed drifts by tens of percent within minutes, so one engine measured after the
# other compares two different machines. Each round measures both engines back to back (the
# order alternating: q3vl first in odd rounds, llama.cpp first in even ones), each ratio comes
# from one round, and the report gives every round and the median.
# The prompt length is q3vl's own benchmark prompt (chat template + 196 image tokens), so both
# engines prefill the same number of tokens (llama-bench's are text tokens, random ids); it is
# known after q3vl's first bench.
Q_PROMPT=""
STARTED=$(date -u +%Y-%m-%dT%H:%MZ)
q3vl_round() {
  local r=$1
  echo "== round $r: q3vl bench (--threads $THREADS --decode-tokens $DECODE), q3vl run" >&2
  /usr/bin/time -v -o "$WORK/q3vl-bench.$r.time" "$Q3VL_BIN" bench --bundle "$WORK/q3vl" --json \
    --threads "$THREADS" --decode-tokens "$DECODE" > "$WORK/q3vl-bench.$r.json" 2> "$WORK/q3vl-bench.$r.log" \
    || { tail -n 40 "$WORK/q3vl-bench.$r.log" >&2; exit 1; }
  Q_PROMPT=$(jget "$WORK/q3vl-bench.$r.json" prompt_tokens)
  # --context 4096 like llama-mtmd-cli's -c below: neither engine sizes a KV cache for 256k.
  /usr/bin/time -v -o "$WORK/q3vl-run.$r.time" "$Q3VL_BIN" run --bundle "$WORK/q3vl" --image "$IMG" \
    --prompt "$PROMPT" --max-new-tokens 1 --threads "$THREADS" --context 4096 --json \
    > "$WORK/q3vl-run.$r.json" 2> "$WORK/q3vl-run.$r.log" || { tail -n 40 "$WORK/q3vl-run.$r.log" >&2; exit 1; }
}
llama_round() {
  local r=$1
  echo "== round $r: llama-bench -p $Q_PROMPT -n $DECODE -t $THREADS -r 1, llama-mtmd-cli" >&2
  /usr/bin/time -v -o "$WORK/llama-bench.$r.time" "$BUILD/bin/llama-bench" -m "$WORK/text.gguf" \
    -p "$Q_PROMPT" -n "$DECODE" -t "$THREADS" -r 1 -o json > "$WORK/llama-bench.$r.json" 2> "$WORK/llama-bench.$r.log" \
    || { tail -n 40 "$WORK/llama-bench.$r.log" >&2; exit 1; }
  # -v: the debug log is the only place that shows the image size fed to the encoder and its
  # token count; it costs nothing measurable after loading.
  /usr/bin/time -v -o "$WORK/mtmd.$r.time" "$BUILD/bin/llama-mtmd-cli" -m "$WORK/text.gguf" \
    --mmproj "$WORK/mmproj.gguf" --image "$IMG" -p "$PROMPT" -n 1 -t "$THREADS" -c 4096 --temp 0 -v \
    > "$WORK/mtmd.$r.log" 2>&1 < /dev/null || { grep -v 'D create_tensor\|D clip_model_loader\|llama_model_loader: -' "$WORK/mtmd.$r.log" | tail -n 40 >&2; exit 1; }
}
for ((r = 1; r <= ROUNDS; r++)); do
  if ((r % 2 == 1)); then q3vl_round "$r"; llama_round "$r"; else llama_round "$r"; q3vl_round "$r"; fi
done
LB_CMD=(llama-bench -m text.gguf -p "$Q_PROMPT" -n "$DECODE" -t "$THREADS" -r 1 -o json)
MT_CMD=(llama-mtmd-cli -m text.gguf --mmproj mmproj.gguf --image img448.png -p "\"$PROMPT\"" -n 1 -t "$THREADS" -c 4096 --temp 0 -v)

# ---- 5. report -----------------------------------------------------------------------------
r() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2fx", a / b }'; }

cat << REPORT
## llama.cpp beside q3vl ($SIZE shape)

Measured from $STARTED to $(date -u +%H:%MZ) on $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores,
$THREADS threads for every run; random-weight checkpoint \`q3vl synth --size $SIZE --seed 0\`.
llama.cpp from llama-cpp-python==$LLAMA_PY_VERSION (vendor/llama.cpp, ggml ${LCPP_COMMIT:-?}), built with
\`-DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release\` ($BUILT); its weights: \`convert_hf_to_gguf.py --outtype q8_0\`
(text.gguf, $(gb "$TEXT_BYTES")) and \`--mmproj --outtype f16\` (mmproj.gguf, $(gb "$MMPROJ_BYTES")).
q3vl: \`q3vl convert --mode int8hu\` ($(gb "$Q3VL_BYTES") of bundles).

$ROUNDS interleaved rounds (in \`$WORK\`, \`engine/bench/bench-peer.sh\`), each running, back to back
(q3vl first in odd rounds, llama.cpp first in even ones):
- \`q3vl bench --bundle q3vl --json --threads $THREADS --decode-tokens $DECODE\`
- \`q3vl run --bundle q3vl --image img448.png --prompt "$PROMPT" --max-new-tokens 1 --threads $THREADS --context 4096\`
- \`${LB_CMD[*]}\`
- \`${MT_CMD[*]}\`

Both benchmarks time warm weights: llama-bench runs an untimed warm-up pass, and
\`q3vl bench\` pages in every mapped tensor (untimed) before its timed passes. Both engines'
files were evicted from the page cache after the conversions, so each engine's first load
read them afresh; the \`run\`s start from whatever the page cache holds then.

Ratio: >1 means q3vl is better (q3vl/llama.cpp for rates, llama.cpp/q3vl for times and memory).
Each round's ratio compares two measurements taken minutes apart; the summary gives the median
round and the range.

REPORT
python3 - "$WORK" "$ROUNDS" "$SIDE" "$DECODE" << 'PY'
import json, re, statistics, sys
work, rounds, side, decode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def rss(path):
    for line in open(path):
        if "Maximum resident set size" in line:
            return int(line.split(":")[1]) * 1024
    raise SystemExit(f"no peak RSS in {path}")

def mtmd(path):
    log = open(path, errors="replace").read()
    # tools/mtmd/mtmd-cli.cpp prints "mtmd batch encoding done in N ms" around
    # mtmd_batch_encode (older helpers: "image slice encoded in N ms"); the debug log names
    # the encoder's input size and the image token count.
    ms = re.search(r"(?:mtmd batch encoding done|image slice encoded) in (\d+) ms", log)
    if not ms:
        raise SystemExit(f"no 'mtmd batch encoding done' line in {path}")
    tok = re.search(r"encoding batch with .* total (\d+) tokens", log)
    size = re.search(r"copying image .* \(nx=(\d+), ny=(\d+)\)", log)
    # llama_perf_context_print: prompt eval time runs from the first llama_decode after a
    # synchronization to the next one (src/llama-context.cpp), and mtmd-cli decodes the first
    # text chunk, encodes the image, then decodes its embeddings and the rest without one,
    # until the first token is sampled. So it covers the image encode too, and is itself the
    # time to the first token (less mtmd's tokenizing and preprocessing, which come before).
    pe = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", log)
    if not pe:
        raise SystemExit(f"no 'prompt eval time' line in {path}")
    if float(pe.group(1)) <= float(ms.group(1)):
        raise SystemExit(f"{path}: prompt eval ({pe.group(1)} ms) does not cover the encode ({ms.group(1)} ms)")
    size = size and f"{size.group(1)}x{size.group(2)}"
    return float(ms.group(1)), tok and int(tok.group(1)), size, float(pe.group(1)), int(pe.group(2))

rows = []
for r in range(1, rounds + 1):
    qb = json.load(open(f"{work}/q3vl-bench.{r}.json"))
    qr = json.load(open(f"{work}/q3vl-run.{r}.json"))
    lb = json.load(open(f"{work}/llama-bench.{r}.json"))
    pp = next(x for x in lb if x["n_prompt"] > 0 and x["n_gen"] == 0)
    tg = next(x for x in lb if x["n_gen"] > 0 and x["n_prompt"] == 0)
    lv, ltok, lsize, lpe, lpe_tok = mtmd(f"{work}/mtmd.{r}.log")
    rows.append(dict(
        q_ttft=qr["timings"]["first_token_ms"], q_bench_ttft=qb["ttft_ms"], l_ttft=lpe,
        l_prompt_eval=lpe, l_prompt_eval_tok=lpe_tok, cpu=qb["cpu"], peaks=qb["peaks"],
        q_prefill_share=qb["prefill_fraction_of_peak"], q_vision_share=qb["vision_fraction_of_peak"],
        sweeps=qb["decode_sweep_by_prefetch_gb_s"], prefetch=qb["decode_prefetch"],
        readers=qb["bandwidth_by_reader_gb_s"], kpath=qb["kernel_path"],
        q_prefill=qb["prefill_tok_s"], l_prefill=pp["avg_ts"],
        q_decode=qb["decode_tok_s"], l_decode=tg["avg_ts"], bound=qb["decode_bound_tok_s"],
        bw=qb["bandwidth_gb_s"], bpt=qb["decode_bytes_per_token"],
        q_vision=qr["timings"]["vision_ms"], q_bench_vision=qb["vision_ms"], l_vision=lv,
        q_imgtok=qb["image_tokens"], l_imgtok=ltok, l_size=lsize, prompt=qb["prompt_tokens"],
        q_run_rss=rss(f"{work}/q3vl-run.{r}.time"), l_run_rss=rss(f"{work}/mtmd.{r}.time"),
        q_bench_rss=rss(f"{work}/q3vl-bench.{r}.time"), l_bench_rss=rss(f"{work}/llama-bench.{r}.time"),
    ))
for x in rows:
    x["r_prefill"] = x["q_prefill"] / x["l_prefill"]
    x["r_decode"] = x["q_decode"] / x["l_decode"]
    x["r_vision"] = x["l_vision"] / x["q_vision"]
    x["r_ttft"] = x["l_ttft"] / x["q_ttft"]

gib = lambda b: f"{b / 2**30:.2f} GiB"
print("| round | first token ms, q3vl run / mtmd-cli (q3vl bench) | ratio | prefill tok/s, q3vl / llama.cpp | ratio | decode tok/s, q3vl / llama.cpp | ratio | decode / bound, q3vl / llama.cpp (bound) | vision ms, q3vl run / mtmd-cli (q3vl bench) | ratio |")
print("|---|---|---|---|---|---|---|---|---|---|")
for i, x in enumerate(rows, 1):
    print(f"| {i} | {x['q_ttft']:.0f} / {x['l_ttft']:.0f} ({x['q_bench_ttft']:.0f}) | {x['r_ttft']:.2f}x "
          f"| {x['q_prefill']:.2f} / {x['l_prefill']:.2f} | {x['r_prefill']:.2f}x "
          f"| {x['q_decode']:.3f} / {x['l_decode']:.3f} | {x['r_decode']:.2f}x "
          f"| {100 * x['q_decode'] / x['bound']:.0f}% / {100 * x['l_decode'] / x['bound']:.0f}% ({x['bound']:.3f} tok/s) "
          f"| {x['q_vision']:.0f} / {x['l_vision']:.0f} ({x['q_bench_vision']:.0f}) | {x['r_vision']:.2f}x |")
print()
med = lambda k: statistics.median(x[k] for x in rows)
rng = lambda k, f="{:.2f}": f"{f.format(min(x[k] for x in rows))}–{f.format(max(x[k] for x in rows))}"
x0 = rows[0]
img = f"both {x0['q_imgtok']} image tokens"
if x0["l_imgtok"] != x0["q_imgtok"] or x0["l_size"] != f"{side}x{side}":
    img = f"llama.cpp resized to {x0['l_size']}, {x0['l_imgtok']} image tokens; q3vl {x0['q_imgtok']}"
print("| what | llama.cpp (range over rounds) | q3vl (range over rounds) | median round's ratio (range) |")
print("|---|---|---|---|")
print(f"| time to first token ms, {side}² image prompt (q3vl run: from the image's preprocessing to the "
      f"first token; mtmd-cli: its prompt eval of {x0['l_prompt_eval_tok']} tokens, which spans its image encode) "
      f"| {rng('l_ttft', '{:.0f}')} | {rng('q_ttft', '{:.0f}')} | {med('r_ttft'):.2f}x ({rng('r_ttft')}) |")
print(f"| prefill tok/s ({x0['prompt']} tokens; llama.cpp: text tokens; q3vl: {x0['q_imgtok']} of them image) "
      f"| {rng('l_prefill')} | {rng('q_prefill')} | {med('r_prefill'):.2f}x ({rng('r_prefill')}) |")
print(f"| decode tok/s ({decode} steps; llama.cpp: empty context; q3vl: after the prompt) "
      f"| {rng('l_decode', '{:.3f}')} | {rng('q_decode', '{:.3f}')} | {med('r_decode'):.2f}x ({rng('r_decode')}) |")
for x in rows:
    x["q_frac"] = 100 * x["q_decode"] / x["bound"]
    x["l_frac"] = 100 * x["l_decode"] / x["bound"]
print(f"| decode / bound (same round's bandwidth / {x0['bpt'] / 1e9:.2f} GB per step) "
      f"| {rng('l_frac', '{:.0f}%')} | {rng('q_frac', '{:.0f}%')} | |")
print(f"| vision encode ms ({side}², {img}) | {rng('l_vision', '{:.0f}')} | {rng('q_vision', '{:.0f}')} "
      f"| {med('r_vision'):.2f}x ({rng('r_vision')}) |")
print(f"| peak RSS, image + prompt + 1 token (mtmd-cli / q3vl run), largest round "
      f"| {gib(max(x['l_run_rss'] for x in rows))} | {gib(max(x['q_run_rss'] for x in rows))} | |")
print(f"| peak RSS, benchmark (llama-bench: text only / q3vl bench: vision + text), largest round "
      f"| {gib(max(x['l_bench_rss'] for x in rows))} | {gib(max(x['q_bench_rss'] for x in rows))} | |")
print()
print(f"Decode bound: each round's `q3vl bench` memory read bandwidth, the fastest of its readers "
      f"({rng('bw')} GB/s) / {x0['bpt'] / 1e9:.2f} GB read per decode step by q3vl, used for both engines.")
print()
c = x0["cpu"]
print(f"CPU (`q3vl bench`): {c.get('name', '?')}, {c.get('vendor', '?')} family {c.get('family', '?')} "
      f"model {c.get('model', '?')} stepping {c.get('stepping', '?')}; features {' '.join(c['features'])}; "
      f"kernel path {x0['kpath']}, decode prefetch {x0['prefetch']}.")
print()
print("| round | instruction peaks, G ops/s (all threads) | prefill (linears + attention) / int16 peak "
      "| vision (linears + attention) / f32 fma peak "
      "| read bandwidth by reader, GB/s | decode sweep by prefetch, GB/s |")
print("|---|---|---|---|---|---|")
pct = lambda v: "n/a" if v is None else f"{100 * v:.0f}%"
for i, x in enumerate(rows, 1):
    peaks = ", ".join(f"{p['form']} {p['g_per_s']:.0f}" for p in x["peaks"].values())
    readers = ", ".join(f"{k} {v:.1f}" for k, v in x["readers"].items())
    sweeps = ", ".join(f"{k} {v:.1f}" for k, v in x["sweeps"].items())
    print(f"| {i} | {peaks} | {pct(x['q_prefill_share'])} | {pct(x['q_vision_share'])} | {readers} | {sweeps} |")
print()
PY

cat << REPORT
| conversion | llama.cpp | q3vl | ratio |
|---|---|---|---|
| wall s (one after the other; page cache not dropped) | $L_CONVERT_TEXT_S text + $L_CONVERT_MMPROJ_S mmproj | $Q_CONVERT_S (both bundles, checksums) | $(r "$((L_CONVERT_TEXT_S + L_CONVERT_MMPROJ_S))" "$Q_CONVERT_S") |
| peak RSS | $(gib "$L_CONVERT_RSS") (text) | $(gib "$Q_CONVERT_RSS") | $(r "$L_CONVERT_RSS" "$Q_CONVERT_RSS") |
| weights on disk | $(gb $((TEXT_BYTES + MMPROJ_BYTES))) (q8_0 text + f16 mmproj) | $(gb "$Q3VL_BYTES") (int8hu) | |

llama.cpp reads its q8_0 text.gguf ($(gb "$TEXT_BYTES")) per decode step, less the token-embedding
table when the head is untied. Peak RSS is /usr/bin/time's maximum resident set (mapped weight
pages count); \`q3vl bench\`'s also holds its ${SIDE}² image pass and bandwidth test buffer.
Load average after the runs: $(cut -d' ' -f1-3 /proc/loadavg).
REPORT
