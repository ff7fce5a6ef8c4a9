#!/usr/bin/env python3
"""Compare two oracle traces tensor by tensor (e.g. `--stream-layers` against a whole-model run).

    python oracle/compare_traces.py A.safetensors B.safetensors [--rtol 1e-5] [--exact]

Prints, per tensor, dtype, shape, the max abs difference and that difference relative to the
tensor's scale (max |B|, at least 1). Exit status 1 when:
  - the two files do not hold the same tensor names, dtypes and shapes;
  - any integer tensor (ids, positions, decode tokens, top-k ids) differs anywhere;
  - any float tensor's max abs difference exceeds rtol * max(1, max |B|)  (rtol default 1e-5:
    about 80 fp32 ulps of the tensor's largest value, far above reduction-order noise and far
    below any real disagreement); with --exact, any float difference at all;
  - a metadata value differs, except `oracle_mode` (and keys given with --ignore-meta).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402


def load(path: str) -> tuple[dict, dict]:
    with safe_open(path, "pt") as f:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}


def compare_tensor(a: torch.Tensor, b: torch.Tensor, rtol: float, exact: bool) -> tuple[bool, str]:
    """(ok, report line tail) for one pair of same-named tensors."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False, f"MISMATCH {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    desc = f"{str(a.dtype).removeprefix('torch.'):8} {str(list(a.shape)):14}"
    if not a.is_floating_point():
        n = int((a != b).sum())
        return n == 0, f"{desc} {'equal' if n == 0 else f'{n} values DIFFER'}"
    d = (a.double() - b.double()).abs()
    dmax = float(d.max()) if d.numel() else 0.0
    scale = max(1.0, float(b.double().abs().max()) if b.numel() else 0.0)
    ok = dmax == 0.0 if exact else dmax <= rtol * scale
    tag = "identical" if dmax == 0.0 else ("ok" if ok else "TOO FAR")
    return ok, f"{desc} max|a-b| {dmax:.3e}  rel {dmax / scale:.3e}  {tag}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rtol", type=float, default=1e-5, help="float tolerance relative to max(1, max|B|)")
    ap.add_argument("--exact", action="store_true", help="floats must be bit-identical")
    ap.add_argument("--ignore-meta", action="append", default=["oracle_mode"], help="metadata key not compared")
    ap.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    args = ap.parse_args(argv)

    meta_a, ta = load(args.a)
    meta_b, tb = load(args.b)
    failures = 0
    for key in sorted(set(meta_a) | set(meta_b)):
        va, vb = meta_a.get(key), meta_b.get(key)
        if va != vb:
            ignored = key in args.ignore_meta
            failures += not ignored
            print(f"meta {key}: {va!r} vs {vb!r}{' (ignored)' if ignored else ' DIFFER'}")
    for name in sorted(set(ta) ^ set(tb)):
        failures += 1
        print(f"{name}: only in {'A' if name in ta else 'B'}")
    worst, identical, common = 0.0, 0, sorted(set(ta) & set(tb))
    for name in common:
        ok, line = compare_tensor(ta[name], tb[name], args.rtol, args.exact)
        failures += not ok
        if ta[name].is_floating_point() and ta[name].shape == tb[name].shape:
            d = float((ta[name].double() - tb[name].double()).abs().max()) if ta[name].numel() else 0.0
            worst = max(worst, d)
            identical += d == 0.0
        elif ok:
            identical += 1
        if not ok or not args.quiet:
            print(f"{name:24} {line}")
    print(
        f"{len(common)} common tensors, {identical} bit-identical, worst float max|a-b| {worst:.3e}, "
        f"{failures} failure(s) [{'exact' if args.exact else f'rtol {args.rtol:g}'}]"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
