"""Runs a `q3vl export gguf` text model in llama.cpp and compares it with q3vl's reference.

llama.cpp (the library built from the source the pinned llama-cpp-python sdist carries,
driven through that package's own ctypes bindings) evaluates each text trace's prompt with
its greedy continuation teacher-forced, in one pass, and returns the logits of every
position. The traces are q3vl's fp32 reference on the bundles the GGUF was exported from,
with full logits (`oracle=q3vl-reference`).

llama.cpp's Q8_0 products also round the activations to int8 per block of 32 (q3vl's
engine rounds them to int16), so its logits differ from the reference by that noise. The
check measures it (sigma: the median RMS logit difference on the reference's top-64), reports
it with the worst centered logits cosine (f64), and requires the same top-1 at every position
where the reference's margin is firm, max(--firm-margin, 5 * sqrt(2) * sigma) as in the token
gates (docs/gates.md), at least one such position per trace, a centered logits cosine of at
least --min-cos at every position, a noise no larger than --max-noise (damage raises the noise,
which alone would only make fewer positions firm), and llama.cpp's tokenizer giving the
prompt's ids back from their text.

Prints one JSON summary; exits 1 naming the first difference, 2 on bad input.
Needs numpy and the llama_cpp package (PYTHONPATH) with LLAMA_CPP_LIB_PATH at the build.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

from common import centered_cos, report

DTYPES = {"I64": np.int64, "F32": np.float32, "F64": np.float64, "I32": np.int32}


def read_trace(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, t in header.items():
        if t["dtype"] in DTYPES:
            a, b = t["data_offsets"]
            out[name] = np.frombuffer(data[8 + n + a : 8 + n + b], dtype=DTYPES[t["dtype"]]).reshape(t["shape"])
    return meta, out


# As the token gates (docs/gates.md): a flip counts only where the reference's margin is at
# least NOISE_Z * sqrt(2) * sigma, sigma the measured logit noise (the margin's error is the
# difference of two logit errors); Gaussian noise flips such a position with p < 3e-7.
NOISE_Z = 5.0
TOP_K = 64


def noise(rows) -> float:
    """The logit noise: the median over positions of the RMS difference of the two
    centered logit rows on the reference's top-64 tokens."""
    per_row = []
    for _, g, want, _ in rows:
        top = np.argsort(-want.astype(np.float64))[:TOP_K]
        d = (g.astype(np.float64) - g.mean()) - (want.astype(np.float64) - want.mean())
        per_row.append(float(np.sqrt(np.mean(d[top] ** 2))))
    return float(np.median(per_row))


def bad_input(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def round_trip(llm, ids: list[int]) -> bool:
    """llama.cpp's tokenizer (the GGUF's vocabulary, merges, token types and pre-tokenizer)
    gives the prompt's ids back from their own text, special tokens included."""
    text = llm.detokenize(ids, special=True)
    return llm.tokenize(text, add_bos=False, special=True) == ids


def check_trace(llm, path: Path, firm_margin: float, min_cos: float, max_noise: float) -> tuple[dict, list[str]]:
    meta, t = read_trace(path)
    if meta.get("oracle") != "q3vl-reference" or "logits" not in t or "decode.logits" not in t:
        bad_input(f"{path}: not a q3vl-reference trace with full logits")
    if meta.get("image"):
        bad_input(f"{path}: an image trace; this check runs text traces")
    ids, tokens = t["input_ids"].tolist(), t["decode.tokens"].tolist()
    seq = ids + tokens[:-1]
    if len(seq) > llm.n_ctx():
        bad_input(f"{path}: {len(seq)} positions, past the context of {llm.n_ctx()}")
    llm.reset()
    llm.eval(seq)
    got = np.array(llm.scores[: len(seq)], dtype=np.float32)
    n = len(ids)
    rows = [(f"prompt {i}", got[i], t["logits"][i], None) for i in range(n)]
    rows += [(f"decode {k}", got[n - 1 + k], t["decode.logits"][k], tokens[k]) for k in range(len(tokens))]
    sigma = noise(rows)
    firm_at = max(firm_margin, NOISE_Z * np.sqrt(2) * sigma)
    faults, cosines, firm = [], [], 0
    if not round_trip(llm, ids):
        faults.append(f"{path.name}: llama.cpp's tokenizer does not give the prompt's ids back from their text")
    # Damage raises the noise, which would otherwise only make fewer positions firm.
    if sigma > max_noise:
        faults.append(f"{path.name}: logit noise {sigma:.4f} above its ceiling {max_noise}")
    for where, g, want, token in rows:
        cosines.append(centered_cos(g, want))
        top2 = np.sort(want.astype(np.float64))[-2:]
        if top2[1] - top2[0] >= firm_at:
            firm += 1
            ref = int(np.argmax(want)) if token is None else token
            if int(np.argmax(g)) != ref:
                faults.append(f"{path.name}: {where}: llama.cpp's top-1 {int(np.argmax(g))}, the reference's {ref}")
    worst = int(np.argmin(cosines))
    if cosines[worst] < min_cos:
        faults.append(f"{path.name}: {rows[worst][0]}: logits cos {cosines[worst]:.6f} < {min_cos}")
    if firm == 0:
        faults.append(f"{path.name}: no firm position (margins < {firm_at:.3f}): nothing to compare")
    summary = {
        "positions": len(rows),
        "firm": firm,
        "firm_margin": firm_at,
        "noise": sigma,
        "min_cos": min(cosines),
        "tokenizer_round_trip": not any("tokenizer" in f for f in faults),
    }
    return summary, faults


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="the text GGUF")
    ap.add_argument("--trace", action="append", required=True, type=Path)
    ap.add_argument("--firm-margin", type=float, default=0.1)
    # The healthy fixtures measure 0.9987 to 0.99999; a damaged model (two layers' weights
    # swapped) 0.73. The floor catches damage the noise would otherwise hide by making every
    # position ambiguous.
    ap.add_argument("--min-cos", type=float, default=0.99)
    # The noise this fixture's healthy export measures, with room (the test gives 2x it).
    ap.add_argument("--max-noise", type=float, required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from llama_cpp import Llama

    try:
        llm = Llama(
            model_path=str(a.model),
            n_ctx=512,
            n_batch=512,
            logits_all=True,
            n_threads=a.threads,
            seed=0,
            verbose=False,
        )
    except (ValueError, OSError) as e:
        print(f"error: {a.model}: llama.cpp cannot load it: {e}", file=sys.stderr)
        return 2
    traces, faults = {}, []
    for p in a.trace:
        summary, f = check_trace(llm, p, a.firm_margin, a.min_cos, a.max_noise)
        traces[p.name] = summary
        faults += f
    return report({"traces": traces}, faults)


if __name__ == "__main__":
    sys.exit(main())
