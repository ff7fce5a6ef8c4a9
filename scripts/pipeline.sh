#!/usr/bin/env bash
# The whole tool in one run: fetch → convert → oracle trace → verify (--stamp) →
# release folder. Only a bundle that passed every gate reaches the release folder.
#
#   make pipeline HF_ID=Qwen/Qwen3-VL-8B-Instruct TRACE_PROMPT="Describe this image." TRACE_IMAGE=house.jpg
#   make pipeline SRC=fixtures/shapes            # a fixture with its committed traces
#
# Variables: HF_ID | SRC, REVISION, MODE (int8hu), OUT (target/pipeline),
# TRACE_PROMPT [TRACE_IMAGE] (make a fresh oracle trace with oracle/trace.py) or
# TRACES (existing trace files; default SRC/traces/*.safetensors), Q3VL (the binary).
set -euo pipefail
Q3VL=${Q3VL:-target/release/q3vl}
OUT=${OUT:-target/pipeline}
MODE=${MODE:-int8hu}
PY=${PY:-oracle/.venv/bin/python}

if [ -n "${HF_ID:-}" ]; then
    echo "== fetch $HF_ID" >&2
    SRC=$("$Q3VL" fetch --hf-id "$HF_ID" ${REVISION:+--revision "$REVISION"})
fi
if [ -z "${SRC:-}" ]; then
    echo "error: pipeline needs HF_ID=... or SRC=..." >&2
    exit 2
fi

rm -rf "$OUT"
mkdir -p "$OUT/traces"
echo "== convert $SRC ($MODE)" >&2
"$Q3VL" convert --src "$SRC" --out "$OUT/bundles" --mode "$MODE" >&2

if [ -n "${TRACE_PROMPT:-}" ]; then
    echo "== oracle trace (fp32 HF)" >&2
    "$PY" oracle/trace.py --model "$SRC" --prompt "$TRACE_PROMPT" \
        ${TRACE_IMAGE:+--image "$TRACE_IMAGE"} --out "$OUT/traces/trace.safetensors" >&2
    TRACES="$OUT/traces/trace.safetensors"
elif [ -z "${TRACES:-}" ]; then
    TRACES=$(ls "$SRC"/traces/*.safetensors 2>/dev/null || true)
fi
if [ -z "${TRACES:-}" ]; then
    echo "error: no traces: give TRACE_PROMPT=... (and TRACE_IMAGE=...) or TRACES=..." >&2
    exit 2
fi
args=()
for t in $TRACES; do args+=(--trace "$t"); done

echo "== verify (fp32 ladder + quantized gates), stamping on success" >&2
"$Q3VL" verify --src "$SRC" --bundle "$OUT/bundles" "${args[@]}" \
    --report "$OUT/report" --junit "$OUT/report/junit.xml" --stamp

# Only reached when every gate passed (verify exits 1 otherwise).
mkdir -p "$OUT/release"
# The bundles only: not q3vl's own entries of the folder (its lock file, leftovers).
find "$OUT/bundles" -mindepth 1 -maxdepth 1 ! -name '.q3vl-*' \
    -exec cp -r {} "$OUT/release/" \;
cp -r "$OUT/report" "$OUT/release/report"
echo "release: $OUT/release"
