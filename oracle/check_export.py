"""Checks a `q3vl export compressed-tensors` folder the way its users will load it.

Three checks, each on what the real libraries do (transformers + compressed-tensors, pinned
in requirements.txt), against the q3vl bundles the export was made from:

1. Weights, bit for bit. transformers loads the export with `dequantize=True` (the
   compressed-tensors library unpacks every `pack-quantized` module into a dense fp32
   weight); every tensor of the language and vision bundles, dequantized exactly as q3vl
   does it (int8 q times its f16 block scale, in f32; f16 and f32 widened), must equal the
   loaded model's tensor of the same name, bit for bit. Independently of the library, a
   numpy unpacking of each `weight_packed` (byte k of int32 word w is column 4w + k, minus
   128) must give the bundle's int8 values, and each `weight_scale` its f16 scales.
2. Inputs. HF's processor built from the export's tokenizer, chat template and preprocessor
   config gives each trace's prompt ids exactly and its pixel values (within 1e-5).
3. Logits. transformers loads the export as a user would (no `dequantize`; fp32) and runs
   each trace's prompt, with its greedy continuation teacher-forced, in one pass. The
   traces are q3vl's fp32 reference on the source bundles, with full logits
   (`oracle=q3vl-reference`). Every prompt and decode position's centered logits cosine
   (f64) must be >= --min-cos, and the argmax must equal the reference's at every firm
   position (reference top-1 margin >= --firm-margin); a trace with no firm position fails.

Prints one JSON summary on stdout; exits 1 naming the first failing tensor or position.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from common import centered_cos, report  # noqa: E402

BLOCK = 32


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a folder's safetensors files (one file or shards), as numpy."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as st:
            for k in st.keys():
                out[k] = st.get_tensor(k)
    return out


def bundle_weights(lang: Path, vision: Path) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """The bundles' tensors dequantized as q3vl does (f32), and the int8 ones as (q, scales)."""
    dense, quantized = {}, {}
    for folder in (lang, vision):
        raw = read_tensors(folder)
        for name, t in raw.items():
            if name.endswith(".scales"):
                continue
            if t.dtype == np.int8:
                s = raw[name + ".scales"]
                q = t.astype(np.float32).reshape(t.shape[0], -1, BLOCK)
                dense[name] = (q * s.astype(np.float32)[:, :, None]).reshape(t.shape)
                quantized[name] = (t, s)
            else:
                dense[name] = t.astype(np.float32)
    return dense, quantized


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a, dtype=np.float32).view(np.uint32),
        np.ascontiguousarray(b, dtype=np.float32).view(np.uint32),
    )


def check_files(export: Path, quantized: dict[str, tuple]) -> list[str]:
    """The numpy unpacking of the export's packed modules against the bundle's int8 values."""
    faults = []
    ex = read_tensors(export)
    for name, (q, s) in sorted(quantized.items()):
        module = name.removesuffix(".weight")
        packed = ex.get(module + ".weight_packed")
        if packed is None:
            if name in ex:  # a dense head, checked with the weights
                continue
            faults.append(f"{module}: no weight_packed in the export")
            continue
        unpacked = (packed.astype("<i4").view(np.uint8).reshape(q.shape).astype(np.int16) - 128).astype(np.int8)
        if not np.array_equal(unpacked, q):
            faults.append(f"{module}.weight_packed: unpacks to other int8 values than the bundle's")
        scale = ex[module + ".weight_scale"]
        if not same_bits(scale, s.astype(np.float32)):
            faults.append(f"{module}.weight_scale: not the bundle's f16 scales")
        if list(ex[module + ".weight_shape"]) != list(q.shape):
            faults.append(f"{module}.weight_shape: {list(ex[module + '.weight_shape'])}, not {list(q.shape)}")
    return faults


def load(export: Path, dequantize: bool, dtype=torch.float32):
    from transformers import CompressedTensorsConfig, Qwen3VLForConditionalGeneration

    kwargs = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    model = Qwen3VLForConditionalGeneration.from_pretrained(str(export), dtype=dtype, **kwargs)
    return model.eval()


def check_weights(export: Path, dense: dict[str, np.ndarray]) -> tuple[int, list[str]]:
    """The library's decompression, bit for bit; returns (tensors compared, faults)."""
    state = {k: v.detach().numpy() for k, v in load(export, dequantize=True).state_dict().items()}
    faults = []
    for name, want in sorted(dense.items()):
        got = state.get(name)
        if got is None:
            faults.append(f"{name}: not in the loaded model")
        elif not same_bits(got, want):
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64)).max() if got.shape == want.shape else None
            faults.append(f"{name}: decompresses to other values than the bundle's (max |diff| {diff})")
    if "lm_head.weight" not in dense:  # a tied head: the embedding serves
        emb = dense["model.language_model.embed_tokens.weight"]
        if not same_bits(state["lm_head.weight"], emb):
            faults.append("lm_head.weight: the tied head is not the bundle's embedding")
    return len(dense), faults


def check_inputs(export: Path, path: Path) -> tuple[dict, list[str]]:
    """The export's tokenizer, chat template and preprocessor config, through HF's own
    processor (image path only: its video processor needs torchvision), must give the
    trace's prompt ids and pixel values."""
    from PIL import Image

    from common import build_inputs, load_processor

    with safe_open(str(path), framework="np") as st:
        meta = st.metadata()
        ids = st.get_tensor("input_ids")
        pixels = st.get_tensor("pixel_values") if meta.get("image") else None
    image = Image.open(path.parent / meta["image"]).convert("RGB") if meta.get("image") else None
    _, inputs = build_inputs(load_processor(export), meta["prompt"], image)
    faults, worst = [], 0.0
    if inputs["input_ids"][0].tolist() != ids.tolist():
        faults.append(f"{path.name}: the export's tokenizer and chat template give other prompt ids")
    if pixels is not None:
        got = inputs["pixel_values"].numpy()
        if got.shape != pixels.shape:
            faults.append(f"{path.name}: the export's preprocessor gives pixel_values {got.shape}, not {pixels.shape}")
        else:
            worst = float(np.abs(got.astype(np.float64) - pixels).max())
            if worst > PIXEL_TOLERANCE:
                faults.append(f"{path.name}: the export's preprocessor moves a pixel value by {worst:.3g}")
    return {"prompt_ids": len(ids), "pixels_max_abs_diff": worst}, faults


# q3vl's image preprocessing is PIL's bicubic resize re-implemented exactly; the normalized
# values may still differ in the last float bits.
PIXEL_TOLERANCE = 1e-5


def trace_rows(model, path: Path) -> list[tuple]:
    """(kind, position, the model's logits, the reference's, the reference's token) for
    every prompt position and every decode step of a q3vl-reference trace, from one
    teacher-forced pass of `model` (the decode steps' logits follow the prompt's last)."""
    with safe_open(str(path), framework="pt") as st:
        t = {k: st.get_tensor(k) for k in st.keys()}
        meta = st.metadata()
    if meta.get("oracle") != "q3vl-reference" or "logits" not in t or "decode.logits" not in t:
        raise SystemExit(f"{path}: not a q3vl-reference trace with full logits")
    ids, tokens = t["input_ids"], t["decode.tokens"]
    seq = torch.cat([ids, tokens[:-1]]).unsqueeze(0)
    kwargs = {}
    if "pixel_values" in t:
        # As the processor marks them: 1 at every image token, 0 elsewhere.
        mm = (seq == model.config.image_token_id).to(torch.int64)
        pixels = t["pixel_values"].to(model.dtype)
        kwargs = {"pixel_values": pixels, "image_grid_thw": t["image_grid_thw"], "mm_token_type_ids": mm}
    with torch.no_grad():
        got = model(input_ids=seq, attention_mask=torch.ones_like(seq), **kwargs).logits[0].float().numpy()
    n = ids.shape[0]
    rows = [("prompt", i, got[i], t["logits"][i].numpy(), None) for i in range(n)]
    rows += [("decode", k, got[n - 1 + k], t["decode.logits"][k].numpy(), int(tokens[k])) for k in range(len(tokens))]
    return rows


def check_trace(model, path: Path, min_cos: float, firm_margin: float) -> tuple[dict, list[str]]:
    rows = trace_rows(model, path)
    tokens = [r for r in rows if r[0] == "decode"]
    faults, cosines, firm = [], [], 0
    for kind, i, g, want, token in rows:
        cos = centered_cos(g, want)
        cosines.append(cos)
        if cos < min_cos:
            faults.append(f"{path.name}: {kind} position {i}: logits cos {cos:.9f} < {min_cos}")
        top2 = np.sort(want.astype(np.float64))[-2:]
        if top2[1] - top2[0] >= firm_margin:
            firm += 1
            ref = int(np.argmax(want)) if token is None else token
            if int(np.argmax(g)) != ref:
                faults.append(f"{path.name}: {kind} position {i}: top-1 {int(np.argmax(g))}, the reference's {ref}")
    if firm == 0:
        faults.append(f"{path.name}: no firm position (every top-1 margin < {firm_margin}): nothing to compare")
    summary = {"positions": len(rows), "firm": firm, "min_cos": min(cosines), "decode_steps": len(tokens)}
    return summary, faults


def measure_dtype(export: Path, dtype: str, traces: list[Path]) -> dict:
    """Not a gate: how far the export loaded in `dtype` (a GPU server's choice) moves
    from the fp32 reference: the worst centered logits cosine and the share of positions
    whose top-1 agrees."""
    model = load(export, dequantize=False, dtype=getattr(torch, dtype))
    cosines, agree, n = [], 0, 0
    for p in traces:
        for _, _, got, want, token in trace_rows(model, p):
            cosines.append(centered_cos(got, want))
            agree += int(np.argmax(got)) == (int(np.argmax(want)) if token is None else token)
            n += 1
    return {"min_cos": min(cosines), "top1_agreement": agree / n, "positions": n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, type=Path)
    ap.add_argument("--bundle", required=True, type=Path, help="the language bundle folder")
    ap.add_argument("--vision", required=True, type=Path, help="the vision bundle folder")
    ap.add_argument("--trace", action="append", default=[], type=Path, help="q3vl-reference traces (full logits)")
    ap.add_argument("--min-cos", type=float, default=0.999999)
    ap.add_argument("--firm-margin", type=float, default=1e-3)
    ap.add_argument(
        "--measure-dtype",
        action="append",
        default=[],
        choices=["float16", "bfloat16"],
        help="also load in this dtype and report (not gate) its distance from the reference",
    )
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    dense, quantized = bundle_weights(a.bundle, a.vision)
    faults = check_files(a.export, quantized)
    compared, weight_faults = check_weights(a.export, dense)
    faults += weight_faults
    model = load(a.export, dequantize=False)
    traces = {}
    for p in a.trace:
        summary, trace_faults = check_trace(model, p, a.min_cos, a.firm_margin)
        inputs, input_faults = check_inputs(a.export, p)
        traces[p.name] = {**summary, **inputs}
        faults += trace_faults + input_faults
    measured = {d: measure_dtype(a.export, d, a.trace) for d in a.measure_dtype}
    out = {
        "transformers": __import__("transformers").__version__,
        "compressed_tensors": __import__("compressed_tensors").__version__,
        "tensors_compared": compared,
        "packed_modules": sum(1 for n in quantized if not n.startswith("lm_head")),
        "traces": traces,
        "measured_dtypes": measured,
    }
    return report(out, faults)


if __name__ == "__main__":
    sys.exit(main())
