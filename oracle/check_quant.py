#!/usr/bin/env python3
"""Recompute every tensor of a converted q3vl bundle from its source checkpoint and compare bytes.

    python oracle/check_quant.py --src CHECKPOINT_DIR --bundle LANGUAGE_BUNDLE_DIR [--vision-bundle DIR]
    python oracle/check_quant.py --self-test [--write-vectors FILE.json]

Implements docs/quantization.md with numpy only (no torch), independently of the
Rust converter:

- int8 per-block-32 on [out, in] (in % 32 == 0), per row r and block b:
  amax = max |W[r, 32b:32b+32]| (f32); "clip" (text body q/k/v/o/gate/up/down):
  s32 = amax / 127, q in [-127, 127]; "absmax" (LM head, int8hu only): s32 = amax / 127.5,
  q in [-128, 127]; s = f16(s32) (round to nearest even); q = clamp(rint(W / f32(s))) with the
  division in f32; s == 0 -> q = 0. Stored as NAME (I8 [out, in]) + NAME.scales (F16 [out, in/32]).
- embedding table f16; every 1-D tensor and the vision pos_embed f32; other vision tensors f16;
  in fp16 mode every other 2-D+ tensor f16. For int8hu with a tied source, lm_head.weight is
  quantized (absmax) from the embedding table and stored as its own tensor.

The bundle folders hold metadata.json ({"mode": "int8hu" | "int8lin" | "fp16", ...}) and one
or more *.safetensors. Every tensor is compared on dtype, shape and raw bytes. Prints a summary;
exits 1 on any mismatch (missing, unexpected, wrong dtype/shape/bytes).
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_safetensors  # noqa: E402

BODY_RE = re.compile(
    r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$"
)
EMBED = "model.language_model.embed_tokens.weight"
HEAD = "lm_head.weight"
POS_EMBED = "model.visual.pos_embed.weight"
MODES = ("int8hu", "int8lin", "fp16")

# ------------------------------------------------------------------------------------------
# minimal safetensors reader (numpy has no bf16)

_DT = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "BF16": np.uint16,
}


class SafeFile:
    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(n))
        self.base = 8 + n
        self.metadata = self.header.pop("__metadata__", None) or {}

    def names(self):
        return list(self.header.keys())

    def info(self, name):
        h = self.header[name]
        return h["dtype"], tuple(h["shape"])

    def raw(self, name) -> bytes:
        start, end = self.header[name]["data_offsets"]
        with open(self.path, "rb") as f:
            f.seek(self.base + start)
            return f.read(end - start)

    def array(self, name) -> np.ndarray:
        dtype, shape = self.info(name)
        a = np.frombuffer(self.raw(name), dtype=np.dtype(_DT[dtype]).newbyteorder("<")).reshape(shape)
        if dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)  # exact widening
        return a


def open_folder(folder: Path) -> dict[str, SafeFile]:
    """name -> SafeFile over every *.safetensors in the folder."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{folder}: no *.safetensors")
    where: dict[str, SafeFile] = {}
    for p in files:
        sf = SafeFile(p)
        for n in sf.names():
            if n in where:
                raise SystemExit(f"{n} is in both {where[n].path.name} and {p.name}")
            where[n] = sf
    return where


# ------------------------------------------------------------------------------------------
# the arithmetic


def quantize_block32(w: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """w: f32 [out, in] -> (q int8 [out, in], scales f16 [out, in/32])."""
    if w.dtype != np.float32 or w.ndim != 2:
        raise ValueError("quantize_block32 wants a 2-D float32 array")
    out_f, in_f = w.shape
    if in_f % 32:
        raise ValueError(f"in = {in_f} is not a multiple of 32")
    blocks = w.reshape(out_f, in_f // 32, 32)
    amax = np.abs(blocks).max(axis=2)  # f32
    if kind == "clip":
        s32 = amax / np.float32(127.0)
        qmin, qmax = -127, 127
    elif kind == "absmax":
        s32 = amax / np.float32(127.5)
        qmin, qmax = -128, 127
    else:
        raise ValueError(kind)
    assert s32.dtype == np.float32
    with np.errstate(over="ignore"):
        s16 = s32.astype(np.float16)  # IEEE round to nearest even, subnormals kept
    if not np.isfinite(s16).all():
        raise ValueError("a block scale overflows f16")
    s = s16.astype(np.float32)[..., None]
    zero = s == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = blocks / np.where(zero, np.float32(1.0), s)  # f32 / f32 -> f32, correctly rounded
    assert ratio.dtype == np.float32
    q = np.clip(np.rint(ratio), qmin, qmax)  # rint: round half to even
    q = np.where(np.broadcast_to(zero, q.shape), np.float32(0.0), q)
    return q.astype(np.int8).reshape(out_f, in_f), s16


def quantize_scalar_reference(row: list[float], kind: str) -> tuple[list[int], list[int]]:
    """An independent, element-by-element version (Python floats, struct for f16/f32 rounding).

    f32 division is emulated by dividing in f64 and rounding to f32, which is exact for
    division (53 >= 2*24 + 2). Returns (q values, f16 scale bit patterns)."""

    def f32(x):
        return struct.unpack("<f", struct.pack("<f", x))[0]

    def f16_bits(x):
        return struct.unpack("<H", struct.pack("<e", x))[0]

    def f16_val(bits):
        return struct.unpack("<e", struct.pack("<H", bits))[0]

    def rint(x):
        # round half to even
        fl = np.floor(x)
        d = x - fl
        if d > 0.5 or (d == 0.5 and fl % 2 == 1):
            return fl + 1
        return fl

    qs, scales = [], []
    denom, qmin, qmax = (127.0, -127, 127) if kind == "clip" else (127.5, -128, 127)
    for b in range(0, len(row), 32):
        blk = [f32(v) for v in row[b : b + 32]]
        amax = max(abs(v) for v in blk)
        s32 = f32(amax / denom)
        bits = f16_bits(s32)
        scales.append(bits)
        s = f16_val(bits)
        for v in blk:
            if s == 0:
                qs.append(0)
            else:
                qs.append(int(min(max(rint(f32(v / s)), qmin), qmax)))
    return qs, scales


def to_f16(w: np.ndarray, name: str, problems: list[str]) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = w.astype(np.float16)
    over = int((~np.isfinite(h) & np.isfinite(w)).sum())
    if over:
        problems.append(f"{name}: {over} values overflow f16 (the converter must refuse this tensor)")
    return h


# ------------------------------------------------------------------------------------------
# expectations


def is_tied(src_dir: Path) -> bool:
    cfg = json.loads((src_dir / "config.json").read_text())
    tc = cfg.get("text_config", {})
    return bool(tc.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))


def mentioned_in_metadata(meta: dict, name: str) -> bool:
    return name in json.dumps(meta)


def expected_tensors(src: dict[str, SafeFile], mode: str, tied: bool, meta: dict, problems: list[str]):
    """Yield (bundle name, dtype, shape, bytes, category) for every tensor the bundle must hold."""
    names = sorted(src.keys())
    if tied and HEAD in src:
        problems.append("note: the source is tied but also stores lm_head.weight; using the stored head")
    for name in names:
        w = src[name].array(name)
        dtype = src[name].info(name)[0]
        if dtype not in ("BF16", "F16", "F32"):
            problems.append(f"{name}: source dtype {dtype} is not a float")
            continue
        w = w.astype(np.float32)
        bad = np.flatnonzero(~np.isfinite(w.reshape(-1)))
        if bad.size:
            problems.append(f"{name}: non-finite source value at flat index {int(bad[0])} (converter must refuse)")
            continue
        is_vision = name.startswith("model.visual.")
        if w.ndim == 1 or name == POS_EMBED:
            yield name, "F32", w.shape, w.astype("<f4").tobytes(), "f32 (1-D / pos_embed)"
        elif is_vision:
            yield name, "F16", w.shape, to_f16(w, name, problems).astype("<f2").tobytes(), "vision f16"
        elif BODY_RE.match(name) and mode in ("int8hu", "int8lin"):
            yield from _int8(name, w, "clip", meta, problems, "body int8 clip")
        elif name == HEAD and mode == "int8hu":
            yield from _int8(name, w, "absmax", meta, problems, "head int8 absmax")
        elif name == EMBED:
            yield name, "F16", w.shape, to_f16(w, name, problems).astype("<f2").tobytes(), "embedding f16"
        else:
            yield name, "F16", w.shape, to_f16(w, name, problems).astype("<f2").tobytes(), "f16"
    if tied and HEAD not in src and mode == "int8hu":
        w = src[EMBED].array(EMBED).astype(np.float32)
        yield from _int8(HEAD, w, "absmax", meta, problems, "head int8 absmax (from tied embedding)")


def _int8(name, w, kind, meta, problems, category):
    if w.ndim != 2:
        problems.append(f"{name}: expected a 2-D weight, got shape {w.shape}")
        return
    if w.shape[1] % 32:
        # the converter must refuse it by name, or keep it f16 when asked to, recording that
        if not mentioned_in_metadata(meta, name):
            problems.append(
                f"{name}: in = {w.shape[1]} is not a multiple of 32 and metadata.json records no fallback for it"
            )
        yield name, "F16", w.shape, w.astype(np.float16).astype("<f2").tobytes(), "f16 fallback (in % 32 != 0)"
        return
    q, s = quantize_block32(w, kind)
    yield name, "I8", q.shape, q.tobytes(), category
    yield name + ".scales", "F16", s.shape, s.astype("<f2").tobytes(), category + " scales"


def first_difference(dtype: str, got: bytes, want: bytes) -> str:
    np_dt = {"F32": "<f4", "F16": "<f2", "I8": "i1"}.get(dtype)
    if np_dt is None or len(got) != len(want):
        return f"{len(got)} bytes vs {len(want)} expected"
    a = np.frombuffer(got, np_dt)
    b = np.frombuffer(want, np_dt)
    diff = np.flatnonzero(a.view(f"u{a.itemsize}") != b.view(f"u{b.itemsize}"))
    i = int(diff[0])
    return f"{diff.size} of {a.size} elements differ; first at flat index {i}: got {a[i]!r}, want {b[i]!r}"


def check(src_dir: Path, bundle_dir: Path, vision_dir: Path | None) -> int:
    meta = json.loads((bundle_dir / "metadata.json").read_text())
    mode = meta.get("mode")
    if mode not in MODES:
        raise SystemExit(f"{bundle_dir}/metadata.json: mode {mode!r} is not one of {MODES}")
    vmeta = {}
    bundle = open_folder(bundle_dir)
    if vision_dir is not None:
        vmeta = (
            json.loads((vision_dir / "metadata.json").read_text()) if (vision_dir / "metadata.json").exists() else {}
        )
        vis = open_folder(vision_dir)
        for n in vis:
            if n in bundle:
                raise SystemExit(f"{n} is in both the language and the vision bundle")
        bundle.update(vis)
    src = open_folder(src_dir)
    tied = is_tied(src_dir)
    have_vision = any(n.startswith("model.visual.") for n in bundle)

    problems: list[str] = []
    mismatches: list[str] = []
    counts: dict[str, list[int]] = {}
    seen = set()
    skipped_vision = 0
    for name, dtype, shape, data, category in expected_tensors(src, mode, tied, {**meta, **vmeta}, problems):
        ok_count = counts.setdefault(category, [0, 0])
        ok_count[1] += 1
        if name.startswith("model.visual.") and not have_vision:
            skipped_vision += 1
            ok_count[1] -= 1
            continue
        if name not in bundle:
            if name == HEAD and tied and mode != "int8hu":
                ok_count[1] -= 1  # a tied f16 head may stay shared with the embedding
                continue
            mismatches.append(f"missing: {name} ({category})")
            continue
        seen.add(name)
        got_dtype, got_shape = bundle[name].info(name)
        if got_dtype != dtype:
            mismatches.append(f"dtype: {name} is {got_dtype}, want {dtype} ({category})")
            continue
        if tuple(got_shape) != tuple(shape):
            mismatches.append(f"shape: {name} is {list(got_shape)}, want {list(shape)}")
            continue
        got = bundle[name].raw(name)
        if got != data:
            mismatches.append(f"bytes: {name} ({category}): {first_difference(dtype, got, data)}")
            continue
        ok_count[0] += 1
    if HEAD in bundle and HEAD not in seen and tied and mode != "int8hu":
        # a tied head stored f16 in int8lin/fp16 must equal the f16 embedding
        want = src[EMBED].array(EMBED).astype(np.float32).astype(np.float16).astype("<f2").tobytes()
        dt, shp = bundle[HEAD].info(HEAD)
        if dt != "F16" or bundle[HEAD].raw(HEAD) != want:
            mismatches.append(f"bytes: {HEAD} (tied, stored): not the f16 embedding table")
        seen.add(HEAD)
    for n in sorted(set(bundle) - seen):
        if n.startswith("model.visual.") and not have_vision:
            continue
        mismatches.append(f"unexpected: {n} {bundle[n].info(n)} is not derived from any source tensor")

    print(f"source:  {src_dir} ({len(src)} tensors, tied={tied})")
    print(f"bundle:  {bundle_dir} (mode {mode})" + (f" + vision {vision_dir}" if vision_dir else ""))
    for cat, (ok, total) in sorted(counts.items()):
        if total:
            print(f"  {cat:42s} {ok:5d}/{total} byte-identical")
    if skipped_vision:
        print(f"  (vision tensors not checked: {skipped_vision}; the bundle holds none, pass --vision-bundle)")
    for p in problems:
        print(f"  problem: {p}")
    for m in mismatches:
        print(f"  MISMATCH {m}")
    bad = len(mismatches) + sum(1 for p in problems if not p.startswith("note:"))
    total = sum(t for _, t in counts.values())
    print(f"{'FAIL' if bad else 'OK'}: {total - len(mismatches)}/{total} tensors match, {bad} problem(s)")
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------
# self-test


def _bf16(x: float) -> float:
    """x must be exactly representable in bf16 (the source format); returns it as f32."""
    f = np.float32(x)
    bits = f.view(np.uint32)
    if bits & 0xFFFF:
        raise ValueError(f"{x!r} is not a bf16 value")
    return float(f)


def self_test_rows():
    rows = []
    # 1. ties at .5 of both signs (clip, amax 127 -> scale exactly 1.0)
    r = [
        2.5,
        -2.5,
        3.5,
        -3.5,
        0.5,
        -0.5,
        1.5,
        -1.5,
        126.5,
        -126.5,
        127.0,
        -127.0,
        4.5,
        -4.5,
        5.5,
        -5.5,
        0.0,
        -0.0,
        1.0,
        -1.0,
        64.5,
        -64.5,
        100.5,
        -100.5,
        7.5,
        -7.5,
        8.5,
        -8.5,
        10.0,
        -10.0,
        11.5,
        -11.5,
    ]
    rows.append(("ties_half_even_clip", "clip", r))
    # 2. an all-zero block, then a block whose scale flushes to 0 in f16 (amax 2^-20 -> 2^-20/127 < 2^-25)
    r = [0.0] * 32 + [2.0**-20 * (1 if i % 2 else -1) * (1 + (i % 4) / 4) / 1.75 for i in range(32)]
    r = [_bf16_round(v) for v in r]
    rows.append(("zero_block_and_scale_flush_clip", "clip", r))
    # 3. subnormal f16 scale, rounded so far that q hits the +127/-127 clamp (clip)
    r = [2.0**-14, -(2.0**-14)] + [2.0**-15 * (i / 30) for i in range(30)]
    r = [_bf16_round(v) for v in r]
    rows.append(("subnormal_scale_clamps_clip", "clip", r))
    # 4. absmax: +127.5 -> 128 -> clamp 127, -127.5 -> -128 (kept), scale exactly 1.0
    r = [127.5, -127.5, 126.5, -126.5, 0.5, -0.5, 1.5, -1.5] + [float(i) - 12.0 for i in range(24)]
    rows.append(("absmax_clamps_head", "absmax", r))
    # 5. the same block as clip: scale f16(127.5/127) = 1.00390625, 127.5/s = 127.004 -> 127
    rows.append(("absmax_values_as_clip", "clip", r))
    # 6. realistic weights (seeded Gaussian, bf16), two blocks, both kinds
    g = np.random.default_rng(0)
    r = [_bf16_round(float(v)) for v in g.normal(0, 0.02, 64)]
    rows.append(("gaussian_clip", "clip", r))
    rows.append(("gaussian_absmax", "absmax", r))
    return rows


def _bf16_round(x: float) -> float:
    """Round x to the nearest bf16 (ties to even) and return it as f32."""
    b = np.array([x], np.float32).view(np.uint32)[0]
    b = (int(b) + 0x7FFF + ((int(b) >> 16) & 1)) >> 16 << 16
    return float(np.array([b], np.uint32).view(np.float32)[0])


def self_test(write_vectors: Path | None) -> int:
    failures = 0
    vectors = []
    for label, kind, row in self_test_rows():
        row = [_bf16(v) for v in row]
        w = np.array([row], np.float32)
        q, s = quantize_block32(w, kind)
        q_ref, s_ref = quantize_scalar_reference(row, kind)
        same = q[0].tolist() == q_ref and s[0].view(np.uint16).tolist() == s_ref
        failures += not same
        bf16_bits = [int(b) >> 16 for b in w[0].view(np.uint32)]
        print(f"[{'ok' if same else 'FAIL: numpy and scalar reference disagree'}] {label} ({kind})")
        print(f"  input bf16 bits : {' '.join(f'{b:04x}' for b in bf16_bits)}")
        print(f"  input values    : {' '.join(repr(float(v)) for v in w[0])}")
        for b in range(s.shape[1]):
            sv = float(s[0, b])
            print(
                f"  block {b}: scale f16 bits {int(s[0, b].view(np.uint16)):04x} (= {sv!r}, s32 "
                f"{float(np.abs(w[0, 32 * b : 32 * b + 32]).max() / np.float32(127.0 if kind == 'clip' else 127.5))!r})"
            )
            print(f"    q i8 bytes    : {q[0, 32 * b : 32 * b + 32].view(np.uint8).tobytes().hex(' ')}")
            print(f"    q values      : {q[0, 32 * b : 32 * b + 32].tolist()}")
        vectors.append(
            {
                "label": label,
                "kind": kind,
                "in": len(row),
                "input_bf16_bits": [f"{b:04x}" for b in bf16_bits],
                "scales_f16_bits": [f"{int(v):04x}" for v in s[0].view(np.uint16)],
                "q": q[0].tolist(),
            }
        )
    # a few hard-coded expectations, so a change in the arithmetic cannot pass silently
    expect = {
        "ties_half_even_clip": [2, -2, 4, -4, 0, 0, 2, -2, 126, -126, 127, -127, 4, -4, 6, -6],
        "absmax_clamps_head": [127, -128, 126, -126, 0, 0, 2, -2],
    }
    for label, kind, row in self_test_rows():
        if label in expect:
            q, _ = quantize_block32(np.array([[_bf16(v) for v in row]], np.float32), kind)
            got = q[0, : len(expect[label])].tolist()
            if got != expect[label]:
                print(f"FAIL {label}: {got} != {expect[label]}")
                failures += 1
    sub = [v for v in vectors if v["label"] == "subnormal_scale_clamps_clip"][0]
    if sub["q"][:2] != [127, -127]:
        print(f"FAIL subnormal clamp: {sub['q'][:2]}")
        failures += 1
    flush = [v for v in vectors if v["label"] == "zero_block_and_scale_flush_clip"][0]
    if flush["scales_f16_bits"] != ["0000", "0000"] or any(flush["q"]):
        print("FAIL zero block / flushed scale")
        failures += 1
    if write_vectors:
        write_vectors.parent.mkdir(parents=True, exist_ok=True)
        write_vectors.write_text(
            json.dumps(
                {
                    "about": "q3vl int8 per-block-32 test vectors from oracle/check_quant.py --self-test "
                    "(docs/quantization.md). One row of `in` values per vector; "
                    "q is row-major, one scale per 32 values.",
                    "vectors": vectors,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {write_vectors}")
    failures += plumbing_self_test()
    print("self-test " + ("FAILED" if failures else "passed"))
    return 1 if failures else 0


def write_reference_bundle(src_dir: Path, out_dir: Path, mode: str) -> None:
    """The bundle tensors this checker expects, written by numpy (one shard, + metadata.json).

    For the plumbing self-test, and as a byte reference for the Rust converter's output."""
    src = open_folder(src_dir)
    tied = is_tied(src_dir)
    fallbacks = [
        n
        for n in src
        if (BODY_RE.match(n) or (n == HEAD and mode == "int8hu")) and mode != "fp16" and src[n].info(n)[1][-1] % 32
    ]
    meta = {"mode": mode, "f16_fallback": sorted(fallbacks), "written_by": "oracle/check_quant.py"}
    problems: list[str] = []
    tensors = {name: (dt, shp, data) for name, dt, shp, data, _ in expected_tensors(src, mode, tied, meta, problems)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(out_dir / "model.safetensors", tensors)
    (out_dir / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")


def plumbing_self_test() -> int:
    """Reference bundles of the committed fixtures must check OK; a flipped byte must not."""
    import tempfile

    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    failures = 0
    for name in ("tied", "odd", "shapes"):
        src = fixtures / name
        if not (src / "model.safetensors").exists():
            print(f"(plumbing: fixtures/{name} not built, skipped)")
            continue
        for mode in MODES:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "bundle"
                write_reference_bundle(src, out, mode)
                import contextlib
                import io

                with contextlib.redirect_stdout(io.StringIO()) as buf:
                    rc_ok = check(src, out, None)
                sf = SafeFile(out / "model.safetensors")
                victim = next(n for n in sorted(sf.names()) if n.endswith(".scales")) if mode != "fp16" else EMBED
                start, _ = sf.header[victim]["data_offsets"]
                with open(out / "model.safetensors", "r+b") as f:
                    f.seek(sf.base + start)
                    b = f.read(1)
                    f.seek(sf.base + start)
                    f.write(bytes([b[0] ^ 1]))
                with contextlib.redirect_stdout(io.StringIO()) as buf2:
                    rc_bad = check(src, out, None)
                ok = rc_ok == 0 and rc_bad == 1 and victim in buf2.getvalue()
                failures += not ok
                print(
                    f"[{'ok' if ok else 'FAIL'}] plumbing {name}/{mode}: reference bundle "
                    f"{'passes' if rc_ok == 0 else 'FAILS'}, one flipped bit in {victim} "
                    f"{'is caught' if rc_bad else 'is NOT caught'}"
                )
                if not ok:
                    print(buf.getvalue())
    return failures


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, help="source checkpoint folder (HF layout)")
    ap.add_argument("--bundle", type=Path, help="language bundle folder (metadata.json + *.safetensors)")
    ap.add_argument("--vision-bundle", type=Path, help="vision bundle folder, if separate")
    ap.add_argument("--self-test", action="store_true", help="quantize hand-made rows and print the expected bytes")
    ap.add_argument("--write-vectors", type=Path, help="with --self-test: also write the vectors as JSON")
    ap.add_argument(
        "--write-reference",
        type=Path,
        metavar="DIR",
        help="write the bundle this checker expects for --src and --mode (numpy), then exit",
    )
    ap.add_argument("--mode", choices=MODES, help="with --write-reference")
    args = ap.parse_args(argv)
    if args.self_test:
        return self_test(args.write_vectors)
    if args.write_reference:
        if not args.src or not args.mode:
            ap.error("--write-reference needs --src and --mode")
        write_reference_bundle(args.src, args.write_reference, args.mode)
        print(f"wrote {args.write_reference}")
        return 0
    if not args.src or not args.bundle:
        ap.error("--src and --bundle are required (or --self-test)")
    return check(args.src, args.bundle, args.vision_bundle)


if __name__ == "__main__":
    sys.exit(main())
