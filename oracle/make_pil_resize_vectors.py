#!/usr/bin/env python3
"""Write the Pillow bicubic-resize vectors committed under model/tests/data/pil_resize/.

    oracle/.venv/bin/python oracle/make_pil_resize_vectors.py [--out DIR] [--verify-rule N]

Each case is a random-noise RGB source PNG and Pillow's `Image.resize((w, h), BICUBIC)`
of it (the call HF's `Qwen2VLImageProcessorPil` makes), listed in `manifest.json`.
`model/tests/pil_resize.rs` decodes both and checks `resize_bicubic` byte for byte.

Pillow resamples in two separable passes, each rounded to 8 bits, so the pass order
changes the bytes. Since Pillow 13 (python-pillow/Pillow#9549) the vertical pass runs
first when the height loses more than twice as many pixels as the width does
(`vertical_first` below); before, the horizontal pass always ran first. The cases
cover both orders (on either side of the `dh == 2*dw` boundary), upscales, extreme
aspect ratios and the two single-pass cases; for every two-pass case the script
checks that the two orders really give different bytes, so a wrong order fails.

`--verify-rule N` also checks `vertical_first` against Pillow on N random size pairs
(sides 1..600) and exits non-zero on any mismatch. Output is deterministic (fixed
seeds, Pillow pinned to 13.0.0 in requirements.txt).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

REPO_DIR = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_DIR / "model" / "tests" / "data" / "pil_resize"
BICUBIC = Image.Resampling.BICUBIC

# (name, (src_w, src_h), (out_w, out_h)); comments give dh = H - h, dw = W - w.
CASES = [
    ("v_first_down", (45, 25), (40, 12)),  # dh 13 > 2*5: vertical first
    ("v_first_widen", (48, 32), (52, 30)),  # width up, height down: vertical first
    ("v_first_tall", (23, 57), (10, 23)),  # dh 34 > 2*13
    ("h_first_mild", (50, 34), (44, 30)),  # dh 4 <= 2*6
    ("h_first_down", (51, 42), (24, 10)),  # dh 32 <= 2*27
    ("h_first_boundary", (40, 40), (30, 20)),  # dh 20 == 2*10: not strictly more
    ("v_first_boundary", (40, 41), (30, 20)),  # dh 21 > 2*10
    ("h_first_upscale", (20, 15), (33, 26)),  # both up: horizontal first
    ("v_first_widen_hard", (8, 64), (40, 9)),  # width x5, height /7
    ("v_first_extreme_tall", (3, 400), (6, 35)),  # 3x400 strip
    ("h_first_extreme_wide", (400, 3), (35, 2)),  # 400x3 strip, dh 1 <= 2*365
    ("only_h_down", (60, 20), (37, 20)),  # one horizontal pass
    ("only_v_down", (20, 60), (20, 27)),  # one vertical pass
    ("only_v_up", (20, 16), (20, 29)),  # one vertical pass, upscaling
]


def vertical_first(src: tuple[int, int], out: tuple[int, int]) -> bool:
    """Pillow 13's pass order (`ImagingResampleInner`)."""
    dw, dh = src[0] - out[0], src[1] - out[1]
    return dh > 0 and dh > 2 * dw


def noise(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def both_orders(im: Image.Image, out: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(horizontal first, vertical first), each pass a one-axis Pillow resize."""
    (w0, h0), (w, h) = im.size, out
    hf = im.resize((w, h0), BICUBIC).resize((w, h), BICUBIC)
    vf = im.resize((w0, h), BICUBIC).resize((w, h), BICUBIC)
    return np.asarray(hf), np.asarray(vf)


def write_vectors(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240613)
    manifest = []
    for i, (name, src_size, out_size) in enumerate(CASES):
        two_pass = src_size[0] != out_size[0] and src_size[1] != out_size[1]
        im = noise(rng, src_size)
        got = np.asarray(im.resize(out_size, BICUBIC))
        hf, vf = both_orders(im, out_size)
        v = vertical_first(src_size, out_size)
        if not np.array_equal(got, vf if v else hf):
            sys.exit(f"{name}: Pillow disagrees with the pass-order rule")
        if two_pass and np.array_equal(hf, vf):
            sys.exit(f"{name}: both orders give the same bytes; pick another case")
        stem = f"{i:02d}_{name}"
        src_file, out_file = f"{stem}_src.png", f"{stem}_out.png"
        im.save(out_dir / src_file, optimize=True)
        Image.fromarray(got, "RGB").save(out_dir / out_file, optimize=True)
        manifest.append(
            {
                "name": name,
                "src": src_file,
                "src_size": list(src_size),
                "out": out_file,
                "out_size": list(out_size),
                "first_pass": "single" if not two_pass else ("vertical" if v else "horizontal"),
                "bytes_differing_from_other_order": int((hf != vf).sum()) if two_pass else 0,
            }
        )
    doc = {
        "what": "PIL.Image.resize((w, h), BICUBIC) of random-noise RGB images",
        "pillow": PIL.__version__,
        "generator": "oracle/make_pil_resize_vectors.py",
        "cases": manifest,
    }
    (out_dir / "manifest.json").write_text(json.dumps(doc, indent=1) + "\n")
    total = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"wrote {len(manifest)} cases to {out_dir} ({total} bytes)")


def verify_rule(n: int, seed: int = 0) -> int:
    """Checks `vertical_first` against Pillow on n random size pairs; returns mismatches."""
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    bad = differ = 0

    def side() -> int:
        return rnd.randint(1, 600)

    for _ in range(n):
        r = rnd.random()
        src = (side(), side())
        if r < 0.15:  # width unchanged
            out = (src[0], side())
        elif r < 0.3:  # height unchanged
            out = (side(), src[1])
        elif r < 0.4:  # extreme aspect ratios
            thin, long = rnd.randint(1, 8), rnd.randint(300, 600)
            src = (thin, long) if rnd.random() < 0.5 else (long, thin)
            out = (side(), side())
        elif r < 0.6:  # near the dh == 2*dw boundary
            w = max(1, rnd.randint(src[0] - 100, src[0] + 20))
            h = src[1] - (2 * (src[0] - w) + rnd.randint(-2, 2))
            out = (w, min(600, max(1, h)))
        else:
            out = (side(), side())
        im = noise(rng, src)
        got = np.asarray(im.resize(out, BICUBIC))
        hf, vf = both_orders(im, out)
        differ += not np.array_equal(hf, vf)
        if not np.array_equal(got, vf if vertical_first(src, out) else hf):
            bad += 1
            print(f"MISMATCH {src} -> {out}")
    print(f"verify-rule: {n} pairs, {differ} where the orders differ, {bad} mismatches")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--verify-rule", type=int, default=0, metavar="N")
    args = ap.parse_args()
    if PIL.__version__ != "13.0.0":
        print(f"warning: Pillow {PIL.__version__}, vectors were made with 13.0.0")
    write_vectors(args.out)
    if args.verify_rule and verify_rule(args.verify_rule):
        sys.exit(1)


if __name__ == "__main__":
    main()
