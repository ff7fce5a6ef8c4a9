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

# write_test_png PATH SIDE writes the benchmarks' SIDE x SIDE test image: a deterministic RGB
# pattern, written with the standard library only.
write_test_png() {
  python3 - "$1" "$2" << 'PY'
import struct, sys, zlib
path, n = sys.argv[1], int(sys.argv[2])
rows = b"".join(
    b"\0" + bytes(v for x in range(n) for v in (x * 255 // n, y * 255 // n, ((x // 32 + y // 32) % 2) * 200))
    for y in range(n))
def chunk(t, d): return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", n, n, 8, 2, 0, 0, 0))
                       + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
PY
}

# evict_page_cache PATH... drops the page cache of every file under each PATH (posix_fadvise
# DONTNEED: no root needed; dirty pages are written first). A file just written by a converter
# sits in the page cache in small folios, and a memory map over those reads markedly slower than
# one over 2 MiB folios (docs/benchmarks-history.md: "Written weights map on small pages"); after
# eviction the engine's first open reads each file afresh, as a deployment's first load does.
evict_page_cache() {
  python3 - "$@" << 'PY'
import os, sys
for top in sys.argv[1:]:
    if not os.path.exists(top):
        sys.exit(f"evict_page_cache: no {top}")
    paths = [top] if os.path.isfile(top) else [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
PY
}
