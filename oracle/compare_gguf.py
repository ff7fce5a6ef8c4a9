"""Compares q3vl's GGUF export with llama.cpp's own conversion of the same checkpoint.

Both text files are read with llama.cpp's gguf-py. The comparison lists the tensors and
metadata keys only one file has, every tensor whose type or shape differs, every key whose
value differs, every other tensor of the same type whose bytes differ (a failure), and, for each tensor
both store as Q8_0, the blocks whose bytes differ.
Each differing int8 value is then explained from the source weight `x` (the checkpoint's
bf16, widened to f32), with `d32 = max|x| / 127` in f32 and `d16` its f16 rounding:

- llama.cpp (quantize_row_q8_0_ref): q = roundf(x * (1/d32)), half away from zero;
- q3vl (docs/quantization.md): q = round_half_even(x / d16).

A difference is a `tie` when x * (1/d32) is exactly halfway between two integers (the
rounding rules differ), or `scale_rounding` when llama.cpp's rule applied with q3vl's
rounded scale d16 gives q3vl's value (the unrounded scale moved x across a half). Any other
difference is `unexplained`, and fails the comparison, as does a value either side stores
that its own rule does not give. Prints one JSON document; exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from safetensors import safe_open

LEAVES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor a GGUF decoder linear comes from."""
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LEAVES:
        return f"model.language_model.layers.{parts[1]}.{LEAVES[parts[2]]}.weight"
    return {"output.weight": "lm_head.weight", "token_embd.weight": "model.language_model.embed_tokens.weight"}.get(
        gguf_name
    )


def source_weights(folder: Path, names: set[str]) -> dict[str, np.ndarray]:
    """The named tensors of a checkpoint folder as f32 (bf16 widened exactly)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in set(st.keys()) & names:
                out[k] = st.get_tensor(k).float().numpy()
    return out


def q8_0_parts(t) -> tuple[np.ndarray, np.ndarray]:
    """(scales f16 [blocks], values int8 [blocks, 32]) of a Q8_0 tensor."""
    raw = np.asarray(t.data).reshape(-1, 34)
    return raw[:, :2].copy().view(np.float16).reshape(-1), raw[:, 2:].view(np.int8)


def round_away(v: np.ndarray) -> np.ndarray:
    """C's roundf, exactly: halves away from zero (v + 0.5 in f32 could itself round)."""
    a = np.abs(v)
    whole = np.floor(a)
    return (np.sign(v) * (whole + (a - whole >= 0.5))).astype(np.int32)


def explain(x: np.ndarray, ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Classifies every differing value of one tensor's blocks (x: [blocks, 32] f32)."""
    amax = np.abs(x).max(axis=1, keepdims=True)
    d32 = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(d32 == 0, np.float32(0), (np.float32(1) / np.where(d32 == 0, 1, d32)).astype(np.float32))
    scaled = (x * inv).astype(np.float32)
    ggml = round_away(scaled)
    d16 = d32.astype(np.float16).astype(np.float32)
    by16 = np.where(d16 == 0, 0, x / np.where(d16 == 0, 1, d16)).astype(np.float32)
    q3vl = np.clip(np.rint(by16), -127, 127).astype(np.int32)
    differ = ours.astype(np.int32) != theirs.astype(np.int32)
    tie = differ & (np.abs(scaled - np.floor(scaled)) == 0.5)
    away16 = round_away(by16)
    scale = differ & ~tie & (away16 == q3vl)
    return {
        "values": int(differ.sum()),
        "blocks": int(differ.any(axis=1).sum()),
        "tie": int(tie.sum()),
        "scale_rounding": int(scale.sum()),
        "unexplained": int((differ & ~tie & ~scale).sum()),
        "ours_follow_q3vl_rule": bool((ours.astype(np.int32) == q3vl).all()),
        "theirs_follow_ggml_rule": bool((theirs.astype(np.int32) == ggml).all()),
    }


def value(field) -> object:
    """A field's GGUF types and value: a U32 and an I32 of one number differ."""
    try:
        v = field.contents()
    except Exception:  # noqa: BLE001  (a field gguf-py cannot render is compared by bytes)
        v = [bytes(p).hex() for p in field.parts]
    return [t.name for t in field.types], v


def compare(ours: Path, theirs: Path, source: Path) -> dict:
    a, b = GGUFReader(str(ours)), GGUFReader(str(theirs))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    fa = {k: value(f) for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: value(f) for k, f in b.fields.items() if not k.startswith("GGUF.")}
    report = {
        "tensors_only_ours": sorted(set(ta) - set(tb)),
        "tensors_only_theirs": sorted(set(tb) - set(ta)),
        "type_or_shape_differs": {},
        "keys_only_ours": sorted(set(fa) - set(fb)),
        "keys_only_theirs": sorted(set(fb) - set(fa)),
        "values_differ": {k: [str(fa[k])[:120], str(fb[k])[:120]] for k in sorted(set(fa) & set(fb)) if fa[k] != fb[k]},
        "bytes_differ": [],
        "q8_0": {},
    }
    src = source_weights(source, {hf_name(n) for n in ta} - {None})
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            pair = [f"{t.tensor_type.name} {list(t.shape)}" for t in (x, y)]
            report["type_or_shape_differs"][name] = pair
            continue
        if x.tensor_type != GGMLQuantizationType.Q8_0:
            if not np.array_equal(np.asarray(x.data), np.asarray(y.data)):
                report["bytes_differ"].append(name)
            continue
        (sa, qa), (sb, qb) = q8_0_parts(x), q8_0_parts(y)
        hf = hf_name(name)
        entry = {"blocks_total": int(len(sa)), "scales_differ": int((sa.view(np.uint16) != sb.view(np.uint16)).sum())}
        if hf in src:
            entry.update(explain(src[hf].reshape(-1, 32), qa, qb))
        report["q8_0"][name] = entry
    # The decoder's linears must differ only by the two rounding rules; the head (q3vl's
    # int8hu head uses another scale, amax/127.5) and the embedding (F16 here) are listed.
    failed = any(
        e.get("unexplained", 1) or not e.get("ours_follow_q3vl_rule", False) or e["scales_differ"]
        for name, e in report["q8_0"].items()
        if name.startswith("blk.")
    )
    report["passed"] = not failed and not report["bytes_differ"]
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ours", required=True, type=Path)
    ap.add_argument("--theirs", required=True, type=Path)
    ap.add_argument("--source", required=True, type=Path, help="the checkpoint both were made from")
    a = ap.parse_args(argv)
    report = compare(a.ours, a.theirs, a.source)
    print(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
