#!/usr/bin/env bash
# Engine benchmark on the 8B shape (part of make bench).
#
# 1. `q3vl synth --size 8b` writes a ~17.5 GB random checkpoint of the real shape
#    (or Q3VL_BENCH_SRC=DIR reuses one, never deleted).
# 2. `q3vl convert` to int8hu bundles (8.7 GB of decoder, 1.1 GB of vision tower).
# 3. `q3vl bench --bundle`: the memory read bandwidth, vision encode of one 448x448
#    image, prefill of the 210-token image prompt, decode, and the decode bound
#    (bandwidth / bytes per token), all measured in the same run; peak RSS.
# Targets (issue 5): decode >= 95% of the bound, peak RSS <= bundle size + 1 GiB.
# Q3VL_BENCH_REPS (default 3) repetitions of vision and prefill + decode: mean ± sd.
# Q3VL_BENCH_DIR (default /tmp/q3vl-bench-engine) holds the work; deleted at the end
# unless KEEP=1. Q3VL_BENCH_SIZE=2b|4b|8b (default 8b) picks the shape.
set -euo pipefail

SIZE=${Q3VL_BENCH_SIZE:-8b}
source "$(dirname "$0")/../../scripts/bench-setup.sh"
bench_setup /tmp/q3vl-bench-engine

SRC="${Q3VL_BENCH_SRC:-$WORK/src}"
if [[ -z "${Q3VL_BENCH_SRC:-}" ]]; then
  echo "== synth $SIZE -> $SRC" >&2
  "$Q3VL_BIN" synth --size "$SIZE" --out "$SRC" --seed 0 --json > "$WORK/synth.json"
fi
echo "== convert int8hu" >&2
"$Q3VL_BIN" convert --src "$SRC" --out "$WORK/out" --mode int8hu --json > "$WORK/convert.json"
BUNDLE_BYTES=$(du -cb "$WORK"/out/*/*.safetensors | tail -1 | cut -f1)
# The engine's open reads the bundles afresh, not the converter's small page-cache folios.
evict_page_cache "$WORK/out"

echo "== bench (vision, prefill, decode)" >&2
"$Q3VL_BIN" bench --bundle "$WORK/out" --json --reps "${Q3VL_BENCH_REPS:-3}" > "$WORK/bench.json"

python3 - "$WORK/bench.json" "$BUNDLE_BYTES" "$SIZE" "$(nproc)" \
  "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)" "$(date -u +%Y-%m-%dT%H:%MZ)" <<'PY'
import json, sys
b = json.load(open(sys.argv[1]))
bundle, size, cores, cpu, when = int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6]
gib = 1 << 30
rss = b["peak_rss_bytes"]
k = b["kernels"]
print(f"## Engine ({size} shape, int8hu)\n")
print(f"Measured {when} on {cores} cores ({cpu}), {b['threads']} threads; "
      "`engine/bench/bench-engine.sh` (`make bench`).\n")
print("| what | value | bound / target |")
print("|---|---|---|")
print(f"| memory read bandwidth (same run, best of before/after) | {b['bandwidth_gb_s']:.2f} GB/s "
      f"({b['bandwidth_before_gb_s']:.2f} / {b['bandwidth_after_gb_s']:.2f}) | |")
print(f"| repetitions (mean ± sd) | {b['reps']} | |")
print(f"| vision encode, 448x448 ({b['image_tokens']} tokens) | {b['vision_ms'] / 1e3:.2f} ± "
      f"{b['vision_ms_sd'] / 1e3:.2f} s ({b['vision_cpu_s']:.1f} CPU-s) | |")
print(f"| prefill, {b['prompt_tokens']} tokens | {b['prefill_tok_s']:.2f} ± {b['prefill_tok_s_sd']:.2f} tok/s "
      f"({b['prefill_ms'] / 1e3:.1f} s, {b['prefill_cpu_s']:.1f} CPU-s) | |")
print(f"| decode, {b['decode_steps']} steps | {b['decode_tok_s']:.3f} ± {b['decode_tok_s_sd']:.3f} tok/s "
      f"({b['decode_cpu_s']:.1f} CPU-s) | bound {b['decode_bound_tok_s']:.3f} tok/s = "
      f"{b['bandwidth_gb_s']:.2f} GB/s / {b['decode_bytes_per_token'] / 1e9:.3f} GB per token |")
print(f"| **decode / bound** | **{100 * b['decode_fraction_of_bound']:.1f}%** | >= 95% |")
print(f"| decode sweep (every int8 weight x 1 token) | {b['decode_sweep_gb_s']:.2f} GB/s | |")
print(f"| weights read (a plain sum over the same mapped bytes) | {b['weights_read_gb_s']:.2f} GB/s | |")
if b.get("weights_huge_page_fraction") is not None:
    print(f"| weights on 2 MiB pages | {100 * b['weights_huge_page_fraction']:.1f}% of {b['weights_resident_bytes'] / 1e9:.2f} GB resident | |")
print(f"| **peak RSS** | **{rss / gib:.2f} GiB** | bundle {bundle / gib:.2f} GiB + 1 GiB = "
      f"{(bundle + gib) / gib:.2f} GiB |")
for name, r in k.items():
    print(f"| kernel {name} | {r['g_per_s']:.1f} G/s ({r['ms']:.1f} ms) | |")
PY
