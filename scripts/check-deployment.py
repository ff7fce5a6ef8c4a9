#!/usr/bin/env python3
"""Checks a deployed model's greedy tokens against q3vl oracle traces (docs/export.md).

For each trace (`qwen3vl-oracle-trace/2`: the prompt, the image beside it, the reference's
greedy tokens and the top logits that chose them), this sends the same conversation to an
OpenAI-compatible chat-completions endpoint (vLLM serving a `q3vl export compressed-tensors`
folder, say) with greedy decoding for as many tokens as the trace recorded, asks for the
generated token ids (vLLM's `return_token_ids`, or `return_tokens_as_token_ids` with
logprobs), and compares them with the reference's step by step.

A step where the two differ fails the check when the reference's top-1 margin there is
firm; at a closer call the rest of the answer is conditioned on another prefix, so the
comparison stops there and passes. Firm means at least the trace's noise-calibrated firm
margin from `q3vl verify`'s report.json (--report, matched by the trace's sha256: the
margin int8 noise cannot flip on that model), else --firm-margin (0.1 logits, the gates'
floor, which int8 noise on a large model can flip: pass --report for such deployments). Prints one JSON summary; exits 0
when every trace passes, 1 when one fails, 2 on bad input (a trace, an image, the endpoint).

Standard library only, so it runs anywhere the endpoint can be reached.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import struct
import sys
import urllib.error
import urllib.request
from pathlib import Path

DTYPES = {"I64": ("q", 8), "I32": ("i", 4), "F32": ("f", 4), "F64": ("d", 8)}


def read_trace(path: Path) -> tuple[dict, dict]:
    """The trace's metadata and the tensors this check reads, as flat lists."""
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    if not meta.get("format", "").startswith("qwen3vl-oracle-trace/"):
        raise ValueError(f"{path}: not a qwen3vl-oracle-trace file")
    out = {}
    for name in ("decode.tokens", "decode.top_ids", "decode.top_values"):
        t = header.get(name)
        if t is None or t["dtype"] not in DTYPES:
            raise ValueError(f"{path}: no tensor {name} of a supported dtype")
        code, size = DTYPES[t["dtype"]]
        a, b = t["data_offsets"]
        count = (b - a) // size
        values = struct.unpack_from(f"<{count}{code}", data, 8 + n + a)
        out[name] = (list(values), t["shape"])
    return meta, out


def margins(tensors: dict) -> list[float]:
    """The reference's top-1 minus top-2 logit at every decode step."""
    values, shape = tensors["decode.top_values"]
    k = shape[1]
    return [values[i * k] - values[i * k + 1] for i in range(shape[0])]


def message(trace: Path, meta: dict) -> list[dict]:
    """The user turn the trace's prompt was: the image first, then the text (Qwen's order)."""
    content = []
    if meta.get("image"):
        image = trace.parent / meta["image"]
        kind = "jpeg" if image.suffix.lower() in (".jpg", ".jpeg") else "png"
        b64 = base64.b64encode(image.read_bytes()).decode()
        content.append({"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{b64}"}})
    content.append({"type": "text", "text": meta["prompt"]})
    return [{"role": "user", "content": content}]


def generated_ids(choice: dict) -> list[int]:
    """The generated token ids from a chat-completions choice (either vLLM spelling)."""
    if isinstance(choice.get("token_ids"), list):
        return [int(t) for t in choice["token_ids"]]
    content = (choice.get("logprobs") or {}).get("content") or []
    ids = []
    for entry in content:
        token = str(entry.get("token", ""))
        if not token.startswith("token_id:"):
            raise ValueError("the endpoint returned no token ids (needs vLLM's return_token_ids)")
        ids.append(int(token.removeprefix("token_id:")))
    return ids


def ask(url: str, model: str, messages: list[dict], steps: int, timeout: float) -> list[int]:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": steps,
        "temperature": 0,
        "seed": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        "logprobs": True,
        "return_tokens_as_token_ids": True,
    }
    req = urllib.request.Request(
        url.rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return generated_ids(json.loads(r.read())["choices"][0])


def compare(reference: list[int], got: list[int], margin: list[float], firm: float) -> dict:
    """Step-by-step agreement; fails at a differing step whose reference margin is firm."""
    for i, want in enumerate(reference):
        if i >= len(got):
            return {"agreed": i, "passed": False, "why": f"the endpoint stopped after {len(got)} tokens"}
        if got[i] != want:
            ok = margin[i] < firm
            why = f"step {i}: token {got[i]}, the reference's {want} (margin {margin[i]:.4f})"
            return {"agreed": i, "passed": ok, "why": why + ("" if ok else f" >= {firm}")}
    return {"agreed": len(reference), "passed": True, "why": "every step agreed"}


def report_margins(path: Path | None) -> dict[str, float]:
    """Trace sha256 -> the firm margin `q3vl verify` calibrated for it (report.json)."""
    if path is None:
        return {}
    report = json.loads(path.read_text())
    return {t["trace_sha256"]: float(t["firm_margin"]) for t in report.get("traces", []) if "firm_margin" in t}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the OpenAI API base, e.g. http://host:8000/v1")
    ap.add_argument("--model", required=True, help="the served model's name")
    ap.add_argument("--trace", action="append", required=True, type=Path)
    ap.add_argument("--firm-margin", type=float, default=0.1, help="without --report, or for a trace it lacks")
    ap.add_argument("--report", type=Path, help="q3vl verify's report.json on these traces")
    ap.add_argument("--timeout", type=float, default=600.0)
    a = ap.parse_args(argv)
    try:
        calibrated = report_margins(a.report)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {a.report}: {e}", file=sys.stderr)
        return 2
    results, passed = {}, True
    for path in a.trace:
        try:
            meta, tensors = read_trace(path)
            messages = message(path, meta)
            firm = calibrated.get(hashlib.sha256(path.read_bytes()).hexdigest(), a.firm_margin)
        except (OSError, ValueError, KeyError, struct.error) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            return 2
        reference = tensors["decode.tokens"][0]
        try:
            got = ask(a.url, a.model, messages, len(reference), a.timeout)
        except (OSError, urllib.error.URLError, ValueError, KeyError, IndexError, TypeError) as e:
            print(f"error: {a.url}: {e}", file=sys.stderr)
            return 2
        r = compare(reference, got, margins(tensors), firm)
        results[path.name] = {**r, "steps": len(reference), "firm_margin": firm}
        passed &= r["passed"]
    print(json.dumps({"passed": passed, "traces": results}, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
