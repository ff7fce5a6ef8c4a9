"""Runs a `q3vl export gguf` pair in llama.cpp and compares it with q3vl's reference.

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

Image traces (with --mmproj) run through llama.cpp's own multimodal path (mtmd): its image
preprocessing from the image file, the projector, and its M-RoPE positions. The number of
image tokens llama.cpp makes must equal the trace's (its resize grid against HF's
smart_resize), the text around the image must tokenize to the trace's ids, and the greedy
continuation, teacher-forced after the prompt, is held to the same rules on its steps (the
prompt's own positions are not exposed by that path).

Prints one JSON summary; exits 1 naming the first difference, 2 on bad input.
Needs numpy and the llama_cpp package (PYTHONPATH) with LLAMA_CPP_LIB_PATH at the build
(libllama and libmtmd).
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


def text_rows(llm, ids: list[int], t: dict, tokens: list[int]) -> list:
    """The prompt with the reference continuation teacher-forced, in one pass: every
    prompt position and every decode step, beside the reference's rows."""
    seq = ids + tokens[:-1]
    llm.reset()
    llm.eval(seq)
    got = np.array(llm.scores[: len(seq)], dtype=np.float32)
    n = len(ids)
    rows = [(f"prompt {i}", got[i], t["logits"][i], None) for i in range(n)]
    rows += [(f"decode {k}", got[n - 1 + k], t["decode.logits"][k], tokens[k]) for k in range(len(tokens))]
    return rows


def open_mtmd(llm, mmproj: Path, threads: int, min_tokens: int | None):
    """llama.cpp's multimodal context on the projector, or exits 2 naming the file."""
    import os

    # libmtmd sits beside libllama in the build.
    if "LLAMA_CPP_LIB_PATH" in os.environ:
        os.environ.setdefault("MTMD_CPP_LIB", os.environ["LLAMA_CPP_LIB_PATH"])
    import llama_cpp.mtmd_cpp as mtmd

    p = mtmd.mtmd_context_params_default()
    p.use_gpu, p.print_timings, p.n_threads, p.warmup = False, False, threads, False
    if min_tokens:
        # llama-mtmd-cli's --image-min-tokens: llama.cpp's own floor for Qwen-VL is 8
        # tokens, where HF's is the preprocessor's shortest_edge.
        p.image_min_tokens = min_tokens
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, p)
    if not ctx:
        bad_input(f"{mmproj}: llama.cpp cannot load the projector")
    return ctx


def image_chunks(llm, ctx, image: Path, ids: list[int]):
    """The prompt as mtmd tokenizes it: the trace's text around the image (its
    <|vision_start|> ... <|vision_end|> span replaced by mtmd's marker, which mtmd wraps in
    the same two tokens) and the image file. Returns (chunks, [(kind, ids or count)])."""
    import ctypes

    import llama_cpp.mtmd_cpp as mtmd

    start, end = (
        llm.tokenize(b"<|vision_start|>", add_bos=False, special=True),
        llm.tokenize(b"<|vision_end|>", add_bos=False, special=True),
    )
    if start[0] not in ids or end[0] not in ids:
        bad_input("an image trace whose ids lack <|vision_start|> or <|vision_end|>")
    vs, ve = ids.index(start[0]), ids.index(end[0])
    text = (
        llm.detokenize(ids[:vs], special=True)
        + mtmd.mtmd_default_marker()
        + llm.detokenize(ids[ve + 1 :], special=True)
    )
    bitmap = mtmd.mtmd_helper_bitmap_init_from_file(ctx, str(image).encode(), False)
    if not bitmap:
        bad_input(f"{image}: llama.cpp cannot read the image")
    inp = mtmd.mtmd_input_text(text=text, text_len=len(text), add_special=False, parse_special=True)
    chunks = mtmd.mtmd_input_chunks_init()
    bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), bitmaps, 1) != 0:
        bad_input(f"{image}: mtmd could not tokenize the prompt with the image")
    parts = []
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        c = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(c) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t(0)
            p = mtmd.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
            parts.append(("text", [p[j] for j in range(n.value)]))
        else:
            parts.append(("image", mtmd.mtmd_input_chunk_get_n_tokens(c)))
    return chunks, parts


def image_rows(llm, ctx, image: Path, ids: list[int], t: dict, tokens: list[int]) -> tuple[list, list[str]]:
    """The image prompt through mtmd (llama.cpp's preprocessing, projector and M-RoPE
    positions), then the reference continuation teacher-forced one step at a time: each
    decode step's logits beside the reference's."""
    import ctypes

    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    chunks, parts = image_chunks(llm, ctx, image, ids)
    ours = [x for kind, v in parts for x in (v if kind == "text" else [-1] * v)]
    # <|image_pad|>: the trace's image placeholders, which mtmd's image chunk stands for.
    pad = llm.tokenize(b"<|image_pad|>", add_bos=False, special=True)[0]
    want = [x if x != pad else -1 for x in ids]
    if ours != want:
        n_img = sum(v for kind, v in parts if kind == "image")
        grid = f"{n_img} image tokens against {want.count(-1)} (its resize grid against HF's smart_resize)"
        return [], [f"llama.cpp's prompt differs from the trace's: {grid}, {len(ours)} positions against {len(want)}"]
    llm.reset()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
    n_past = llama_cpp.llama_pos(0)
    if mtmd.mtmd_helper_eval_chunks(ctx, llm._ctx.ctx, chunks, 0, 0, llm.n_batch, True, ctypes.byref(n_past)) != 0:
        return [], ["mtmd could not evaluate the prompt"]
    n_vocab = llm.n_vocab()
    rows = []
    batch = llama_cpp.llama_batch_init(1, 0, 1)
    try:
        for k in range(len(tokens)):
            logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            row = np.ctypeslib.as_array(logits, shape=(n_vocab,)).astype(np.float32).copy()
            rows.append((f"decode {k}", row, t["decode.logits"][k], tokens[k]))
            if k + 1 == len(tokens):
                break
            batch.n_tokens = 1
            batch.token[0], batch.pos[0], batch.n_seq_id[0] = tokens[k], n_past.value + k, 1
            batch.seq_id[0][0], batch.logits[0] = 0, True
            if llama_cpp.llama_decode(llm._ctx.ctx, batch) != 0:
                return [], [f"decode step {k}: llama_decode failed"]
    finally:
        llama_cpp.llama_batch_free(batch)
    return rows, []


def check_trace(
    llm, mtmd_ctx, path: Path, firm_margin: float, min_cos: float, max_noise: float
) -> tuple[dict, list[str]]:
    meta, t = read_trace(path)
    if meta.get("oracle") != "q3vl-reference" or "logits" not in t or "decode.logits" not in t:
        bad_input(f"{path}: not a q3vl-reference trace with full logits")
    ids, tokens = t["input_ids"].tolist(), t["decode.tokens"].tolist()
    if len(ids) + len(tokens) > llm.n_ctx():
        bad_input(f"{path}: {len(ids) + len(tokens)} positions, past the context of {llm.n_ctx()}")
    faults = []
    if meta.get("image"):
        if mtmd_ctx is None:
            bad_input(f"{path}: an image trace needs the projector (--mmproj)")
        rows, f = image_rows(llm, mtmd_ctx, path.parent / meta["image"], ids, t, tokens)
        faults += [f"{path.name}: {x}" for x in f]
        if not rows:
            return {"positions": 0}, faults
    else:
        rows = text_rows(llm, ids, t, tokens)
    sigma = noise(rows)
    firm_at = max(firm_margin, NOISE_Z * np.sqrt(2) * sigma)
    cosines, firm = [], 0
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
    ap.add_argument("--mmproj", type=Path, help="the projector GGUF, for image traces")
    ap.add_argument(
        "--image-min-tokens",
        type=int,
        help="as llama-mtmd-cli's option: the image token floor (HF's is shortest_edge / (patch * merge)^2)",
    )
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
            n_ctx=1024,
            n_batch=512,
            logits_all=True,
            n_threads=a.threads,
            seed=0,
            verbose=False,
        )
    except (ValueError, OSError) as e:
        print(f"error: {a.model}: llama.cpp cannot load it: {e}", file=sys.stderr)
        return 2
    mtmd_ctx = open_mtmd(llm, a.mmproj, a.threads, a.image_min_tokens) if a.mmproj else None
    traces, faults = {}, []
    for p in a.trace:
        summary, f = check_trace(llm, mtmd_ctx, p, a.firm_margin, a.min_cos, a.max_noise)
        traces[p.name] = summary
        faults += f
    return report({"traces": traces}, faults)


if __name__ == "__main__":
    sys.exit(main())
