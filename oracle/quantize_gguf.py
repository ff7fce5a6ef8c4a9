"""Requantizes a GGUF text model with llama.cpp's own quantizer (`llama_model_quantize`).

The 4-, 5- and 6-bit files `q3vl verify --gguf` is tested on are made by the peer's own
quantizer (what llama-quantize runs), through the pinned llama-cpp-python package's ctypes
bindings to the library `make llama-cpp` builds. The tests requantize llama.cpp's Q8_0
conversion (users quantize from F16 or BF16; from Q8_0 the 4-bit grid lands on values
already rounded once, which only adds a little noise). Where a tensor's rows do not fit a
K-quant's 256-value super-blocks, llama.cpp falls back to another type, as it does for
real models: on the 64-wide fixtures most tensors of a "K" file are Q5_0, Q5_1 or Q8_0.

Usage: quantize_gguf.py IN.gguf OUT.gguf TYPE (q4_0, q4_1, q5_0, q5_1, q6_k, q4_k_m, q5_k_m).
Exits 2 on bad input, 1 when llama.cpp's quantizer fails.
Needs the llama_cpp package (PYTHONPATH) with LLAMA_CPP_LIB_PATH at the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[3] not in TYPES or not Path(sys.argv[1]).is_file():
        print(f"usage: quantize_gguf.py IN.gguf OUT.gguf {{{','.join(TYPES)}}}", file=sys.stderr)
        return 2
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = TYPES[sys.argv[3]]
    # The input is already quantized (Q8_0): requantizing is what the test asks for.
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
    if rc != 0:
        print(f"{sys.argv[1]}: llama_model_quantize returned {rc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
