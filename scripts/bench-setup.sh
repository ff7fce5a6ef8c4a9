# Sourced by the benchmark scripts (convert/bench, engine/bench): the setup they share.
#
# bench_setup DEFAULT_WORK sets ROOT (the repository), WORK ($Q3VL_BENCH_DIR, else
# DEFAULT_WORK), KEEP ($KEEP, else 0) and Q3VL_BIN (built in release mode when unset),
# empties WORK, and removes it when the script exits unless KEEP=1.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

bench_setup() {
  WORK=${Q3VL_BENCH_DIR:-$1}
  KEEP=${KEEP:-0}
  if [[ -z "${Q3VL_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --release --quiet --bin q3vl)
    Q3VL_BIN="$ROOT/target/release/q3vl"
  fi
  trap 'if [[ "$KEEP" != 1 ]]; then rm -rf "$WORK"; fi' EXIT
  rm -rf "$WORK"
  mkdir -p "$WORK"
}
