#!/usr/bin/env bash
# The engine of this checkout against the engine of an earlier commit (make bench-ab), for
# changes that must not cost speed or change a bit.
#
# 1. Builds $Q3VL_AB_BASE (default HEAD~1) in a temporary worktree (release, its own target
#    folder under $Q3VL_AB_DIR, reused by later runs of the same commit), unless
#    Q3VL_AB_BASE_BIN names that commit's binary already built.
# 2. `q3vl synth --size $Q3VL_BENCH_SIZE` (default 8b), or Q3VL_BENCH_SRC=DIR reuses one.
# 3. Both binaries convert it to int8hu: the bundles must be byte-identical (cmp of every file;
#    metadata.json may differ only in the producing commit and the companion digest it implies).
# 4. Both answer one image prompt greedily: the token ids must be identical.
# 5. $Q3VL_AB_ROUNDS (default 3) interleaved rounds of `q3vl bench --json --reps 1` (vision,
#    prefill, decode, the bandwidth bound), the base first in odd rounds, this checkout first in
#    even ones: the host drifts, so every ratio compares two runs of the same round.
# Q3VL_AB_BENCH_ARGS adds options to every `q3vl bench` (e.g. "--decode-tokens 48" for
# a steadier decode figure). The markdown table goes to stdout. Work in $Q3VL_BENCH_DIR (default /tmp/q3vl-bench-ab),
# deleted at the end unless KEEP=1.
set -euo pipefail

SIZE=${Q3VL_BENCH_SIZE:-8b}
source "$(dirname "$0")/../../scripts/bench-setup.sh"
BASE=$(cd "$ROOT" && git rev-parse --short "${Q3VL_AB_BASE:-HEAD~1}")
ROUNDS=${Q3VL_AB_ROUNDS:-3}
THREADS=${Q3VL_AB_THREADS:-2}
AB=${Q3VL_AB_DIR:-/tmp/q3vl-ab}
bench_setup /tmp/q3vl-bench-ab

base_bin=${Q3VL_AB_BASE_BIN:-"$AB/$BASE/target/release/q3vl"}
if [[ ! -x "$base_bin" ]]; then
  echo "== build base $BASE in $AB/$BASE" >&2
  rm -rf "$AB/$BASE"
  mkdir -p "$AB"
  git -C "$ROOT" worktree add --detach --force "$AB/$BASE" "$BASE" >&2
  (cd "$AB/$BASE" && cargo build --release --quiet --bin q3vl)
fi
[[ -x "$base_bin" ]] || { echo "base binary $base_bin missing" >&2; exit 1; }

SRC="${Q3VL_BENCH_SRC:-$WORK/src}"
if [[ -z "${Q3VL_BENCH_SRC:-}" ]]; then
  echo "== synth $SIZE -> $SRC" >&2
  "$Q3VL_BIN" synth --size "$SIZE" --out "$SRC" --seed 0 --json > /dev/null
fi

echo "== convert with both binaries; the bundles must be byte-identical" >&2
"$base_bin" convert --src "$SRC" --out "$WORK/base" --mode int8hu --json > /dev/null
"$Q3VL_BIN" convert --src "$SRC" --out "$WORK/new" --mode int8hu --json > /dev/null
(cd "$WORK/base" && find . -type f | sort) > "$WORK/files"
(cd "$WORK/new" && find . -type f | sort) | cmp -s - "$WORK/files" \
  || { echo "FAIL: the two conversions wrote different files" >&2; exit 1; }
# metadata.json names the producing commit, and its companion's digest follows from that:
# those two fields may differ, nothing else.
same_metadata() {
  python3 - "$1" "$2" << 'PY'
import json, sys
def strip(p):
    d = json.load(open(p))
    d["producer"].pop("commit", None)
    d.pop("companion_sha256", None)
    return d
sys.exit(strip(sys.argv[1]) != strip(sys.argv[2]))
PY
}
while read -r f; do
  if [[ "$f" == */metadata.json ]]; then
    same_metadata "$WORK/base/$f" "$WORK/new/$f"
  else
    cmp -s "$WORK/base/$f" "$WORK/new/$f"
  fi || { echo "FAIL: bundles differ at $f" >&2; exit 1; }
done < "$WORK/files"
echo "bundles: $(wc -l < "$WORK/files") files, byte-identical but for the producer's commit" >&2
rm -rf "$WORK/base"
OUT="$WORK/new"

echo "== one greedy image answer from each: the tokens must be identical" >&2
write_test_png "$WORK/img448.png" 448
answer() {
  "$1" run --bundle "$OUT" --image "$WORK/img448.png" --prompt "Describe this image briefly." \
    --max-new-tokens 8 --threads "$THREADS" --json 2>/dev/null | tail -1 | python3 -c \
    'import json, sys; print(json.load(sys.stdin)["tokens"])'
}
base_tokens=$(answer "$base_bin")
new_tokens=$(answer "$Q3VL_BIN")
[[ "$base_tokens" == "$new_tokens" ]] || {
  echo "FAIL: tokens differ: base $base_tokens, new $new_tokens" >&2
  exit 1
}
echo "tokens identical: $new_tokens" >&2

# shellcheck disable=SC2086 # Q3VL_AB_BENCH_ARGS is a list of options
bench() { "$1" bench --bundle "$OUT" --json --reps 1 --threads "$THREADS" ${Q3VL_AB_BENCH_ARGS:-} > "$2"; }
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r of $ROUNDS" >&2
  if (( r % 2 )); then
    bench "$base_bin" "$WORK/base.$r.json"; bench "$Q3VL_BIN" "$WORK/new.$r.json"
  else
    bench "$Q3VL_BIN" "$WORK/new.$r.json"; bench "$base_bin" "$WORK/base.$r.json"
  fi
done

python3 - "$WORK" "$ROUNDS" "$BASE" "$(cd "$ROOT" && git rev-parse --short HEAD)" \
  "$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)" "$(nproc)" "$SIZE" \
  "$(date -u +%Y-%m-%dT%H:%MZ)" "$THREADS" <<'PY'
import json, statistics, sys
work, rounds, base, head, cpu, cores, size, when, threads = sys.argv[1:]
rows = [(json.load(open(f"{work}/base.{r}.json")), json.load(open(f"{work}/new.{r}.json")))
        for r in range(1, int(rounds) + 1)]
print(f"Measured {when} on {cpu} ({cores} cores), {threads} threads, {size} shape, int8hu; "
      f"base {base}, new {head} (`make bench-ab`). Bundles byte-identical (but for the producing commit), tokens identical.\n")
print("| round | prefill tok/s, base / new | decode tok/s, base / new | vision ms, base / new | bandwidth GB/s, base / new |")
print("|---|---|---|---|---|")
ratios = {"prefill": [], "decode": [], "vision": []}
for i, (b, n) in enumerate(rows, 1):
    print(f"| {i} | {b['prefill_tok_s']:.2f} / {n['prefill_tok_s']:.2f} | "
          f"{b['decode_tok_s']:.3f} / {n['decode_tok_s']:.3f} | "
          f"{b['vision_ms']:.0f} / {n['vision_ms']:.0f} | "
          f"{b['bandwidth_gb_s']:.2f} / {n['bandwidth_gb_s']:.2f} |")
    ratios["prefill"].append(n["prefill_tok_s"] / b["prefill_tok_s"])
    ratios["decode"].append(n["decode_tok_s"] / b["decode_tok_s"])
    ratios["vision"].append(b["vision_ms"] / n["vision_ms"])
print("\nnew / base (>1: the new engine is faster), median round (range):\n")
for k, v in ratios.items():
    print(f"- {k}: {statistics.median(v):.3f}x ({min(v):.3f}–{max(v):.3f})")
PY
