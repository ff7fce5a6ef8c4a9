# Sourced by the scripts that run llama.cpp (engine/bench/bench-peer.sh, make llama-cpp): the
# llama.cpp source carried by the PyPI sdist llama-cpp-python==$LLAMA_PY_VERSION
# (vendor/llama.cpp, with the package's own Python bindings beside it), fetched and built once
# with cmake (-DGGML_NATIVE=ON, Release, shared libraries) into $PEER and reused by later runs.
#
# llama_cpp_setup expects PEER and LLAMA_PY_VERSION and sets LSRC (the sdist, whose llama_cpp/
# package goes on PYTHONPATH), LCPP (the llama.cpp tree), VENV (cmake, ninja, sentencepiece,
# numpy for the converter and the checks), BUILD (bin/ holds the tools, llama-server among
# them for make bench-serve, and the shared libraries: LLAMA_CPP_LIB_PATH), BUILT (how it was
# had) and LCPP_COMMIT.
LLAMA_PY_VERSION=${LLAMA_PY_VERSION:-0.3.36}

llama_cpp_now() { date +%s.%N; }
llama_cpp_logged() {
  local log=$1
  shift
  if ! "$@" > "$log" 2>&1; then
    echo "FAILED: $*  (last lines of $log)" >&2
    tail -n 40 "$log" >&2
    return 1
  fi
}

llama_cpp_setup() {
  local logged=llama_cpp_logged now=llama_cpp_now
  mkdir -p "$PEER"
  LSRC="$PEER/llama-cpp-python-$LLAMA_PY_VERSION"
  LCPP="$LSRC/vendor/llama.cpp"
  # AMX: on a host whose CPU reports amx_int8, -march=native compiles ggml's AMX matmul, and on
  # the 2-core Xeon VM it faulted at its first `ldtilecfg` (SIGSEGV under gdb, SIGILL in
  # llama-bench; the kernel grants the tile state, ARCH_REQ_XCOMP_PERM returns 0). The build
  # then turns the AMX ISA off (everything else stays native: AVX-512, VNNI, BF16);
  # Q3VL_PEER_AMX=1 keeps it, for hosts where it works.
  AMX_FLAGS=()
  AMX_NOTE=""
  if grep -qw amx_int8 /proc/cpuinfo && [[ "${Q3VL_PEER_AMX:-0}" != 1 ]]; then
    AMX_FLAGS=(-DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
      -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
    AMX_NOTE=" with AMX off (-mno-amx-tile -mno-amx-int8 -mno-amx-bf16: its AMX matmul faults on this host)"
  fi
  BUILD="$PEER/build-$LLAMA_PY_VERSION${AMX_FLAGS:+-noamx}"
  VENV="$PEER/venv"
  if [[ ! -f "$LCPP/convert_hf_to_gguf.py" ]]; then
    echo "== fetch llama-cpp-python==$LLAMA_PY_VERSION (sdist) -> $LSRC" >&2
    rm -rf "$PEER/dl" "$LSRC.tmp"
    mkdir -p "$PEER/dl" "$LSRC.tmp"
    # --no-binary for this package only: with `:all:` pip would also build its build
    # dependencies (cmake, ninja) from source just to read the sdist's metadata.
    $logged "$PEER/download.log" python3 -m pip download --no-deps --no-binary llama-cpp-python \
      "llama-cpp-python==$LLAMA_PY_VERSION" -d "$PEER/dl"
    tar xzf "$PEER/dl/llama_cpp_python-$LLAMA_PY_VERSION.tar.gz" -C "$LSRC.tmp" --strip-components=1
    mv "$LSRC.tmp" "$LSRC"
    rm -rf "$PEER/dl"
  fi
  # The converter is split into conversion/*.py in this version; look in both places.
  if ! grep -rqs 'Qwen3VLForConditionalGeneration' "$LCPP/convert_hf_to_gguf.py" "$LCPP/conversion"; then
    echo "this llama.cpp has no Qwen3VLForConditionalGeneration converter: cannot compare" >&2
    return 1
  fi
  if [[ ! -x "$VENV/bin/cmake" || ! -x "$VENV/bin/ninja" ]] \
    || ! "$VENV/bin/python" -c 'import sentencepiece, numpy, diskcache, jinja2, typing_extensions' 2> /dev/null; then
    echo "== venv for the build and the converter -> $VENV" >&2
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # No cmake on the machine by default: the PyPI wheel brings one, no root needed. numpy,
    # diskcache, jinja2 and typing_extensions are what the package's bindings import
    # (oracle/check_gguf.py; its setup declares them, but the sdist is not pip-installed here,
    # and typing_extensions stopped arriving with the others).
    $logged "$PEER/venv.log" "$VENV/bin/pip" install cmake ninja sentencepiece numpy diskcache \
      jinja2 typing_extensions
  fi
  if [[ ! -x "$BUILD/bin/llama-bench" || ! -x "$BUILD/bin/llama-mtmd-cli" || ! -x "$BUILD/bin/llama-server" ]]; then
    echo "== build llama.cpp (llama-bench, llama-mtmd-cli, llama-server; -j2, a while on 2 cores) -> $BUILD" >&2
    t0=$($now)
    $logged "$PEER/cmake.log" "$VENV/bin/cmake" -S "$LCPP" -B "$BUILD" -G Ninja \
      -DCMAKE_MAKE_PROGRAM="$VENV/bin/ninja" -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF "${AMX_FLAGS[@]}"
    $logged "$PEER/build.log" nice -n 10 "$VENV/bin/cmake" --build "$BUILD" -j2 \
      --target llama-bench llama-mtmd-cli llama-server
    t1=$($now)
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }' > "$BUILD/build-seconds"
    BUILT="built by this run in $(cat "$BUILD/build-seconds") s"
  else
    BUILT="cached; built by an earlier run in $(cat "$BUILD/build-seconds" 2> /dev/null || echo '?') s"
  fi
  BUILT="$BUILT$AMX_NOTE"
  echo "   llama.cpp: $BUILT" >&2
  LCPP_COMMIT=$(sed -n 's/.*ggml commit: *//p' "$PEER/cmake.log" 2> /dev/null | head -1)
}
