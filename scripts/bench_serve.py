"""Measure an OpenAI-compatible chat server (q3vl serve, llama.cpp's llama-server).

Two measurements, standard library only:

- decode: N concurrent greedy streams (a short text prompt, `ignore_eos`, `--tokens` new
  tokens each, started together). Each content chunk's arrival is timed; the aggregate
  rate counts the chunks of every stream inside the window where all N streams are
  decoding (from the last stream's first chunk to the first stream's last chunk), so
  neither prefill nor a straggler's tail is in it.
- ttft: time to the first content chunk of a streamed answer about a SIDE x SIDE image
  (vision + prefill + one decode step), one request at a time; each repetition uses
  another image, so no image or prompt cache of either server helps.

Prints one JSON document.
"""

import argparse
import http.client
import json
import statistics
import struct
import threading
import time
import zlib
from base64 import b64encode


def png(side: int, variant: int) -> bytes:
    """A deterministic RGB test picture; `variant` changes every pixel."""
    rows = b"".join(
        b"\0"
        + bytes(
            v
            for x in range(side)
            for v in (
                (x * 255 // side + variant * 37) % 256,
                y * 255 // side,
                ((x // 32 + y // 32 + variant) % 2) * 200,
            )
        )
        for y in range(side)
    )

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

    head = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def stream(host: str, port: int, body: dict) -> tuple[float, list[float]]:
    """POSTs a streamed chat request; returns the send time and each content chunk's arrival."""
    conn = http.client.HTTPConnection(host, port, timeout=3600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    arrivals = []
    for line in resp:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        choices = json.loads(data).get("choices") or []
        if choices and choices[0].get("delta", {}).get("content"):
            arrivals.append(time.perf_counter())
    conn.close()
    return t0, arrivals


def decode(host, port, model, streams: int, tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    results = [None] * streams

    def one(i):
        results[i] = stream(host, port, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    firsts = [a[0] for _, a in results if a]
    lasts = [a[-1] for _, a in results if a]
    t0, t1 = max(firsts), min(lasts)
    inside = sum(1 for _, a in results for t in a if t0 <= t <= t1)
    return {
        "streams": streams,
        "chunks": [len(a) for _, a in results],
        "window_s": t1 - t0,
        "tok_s": inside / (t1 - t0) if t1 > t0 else None,
    }


def ttft(host, port, model, side: int, reps: int, prompt: str, first_variant: int) -> dict:
    times = []
    for r in range(reps):
        url = "data:image/png;base64," + b64encode(png(side, first_variant + r)).decode()
        body = {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": prompt}],
                }
            ],
            "max_tokens": 1,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        t0, arrivals = stream(host, port, body)
        if not arrivals:
            raise SystemExit("the image answer had no content chunk")
        times.append(arrivals[0] - t0)
    return {"side": side, "reps": times, "median_s": statistics.median(times)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--model", default="bench")
    ap.add_argument("--streams", default="1,2,4,8", help="concurrency levels, comma-separated")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per decode stream")
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--ttft-reps", type=int, default=2)
    ap.add_argument("--variant", type=int, default=0, help="first test-image variant (another per round)")
    ap.add_argument("--prompt", default="Describe this image briefly.")
    args = ap.parse_args(argv)
    out = {
        "ttft": ttft(args.host, args.port, args.model, args.side, args.ttft_reps, args.prompt, args.variant),
        "decode": [decode(args.host, args.port, args.model, int(n), args.tokens) for n in args.streams.split(",")],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
