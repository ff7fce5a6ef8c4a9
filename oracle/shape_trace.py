#!/usr/bin/env python3
"""Write a shape-only `qwen3vl-oracle-trace/2` file for a checkpoint too big for the fp32 oracle.

    python oracle/shape_trace.py --model DIR --prompt TEXT [--image PATH] --out FILE.safetensors \
        [--decode-steps 24] [--top-k 64] [--seed 0]

For memory and speed work on `q3vl synth --size 8b` checkpoints (random weights, 35 GB in
fp32: the oracle cannot run them on a 24 GiB machine). The prompt side is real: input_ids
from the checkpoint's chat template and processor, position_ids from HF `get_rope_index`
(on a model built on the meta device, so no weights are loaded), pixel_values and
image_grid_thw from the processor. Every activation, logit and decode token is seeded random
noise of the right shape, so a verifier runs every stage and every gate of the real thing
and allocates what it would allocate, but its numeric gates FAIL: such a trace measures
resources, never accuracy. Its metadata says so (`model` starts with "shape-only:", `oracle` is
"shape-only", `oracle_mode` "none"). Its `*.lse` rows are the float64 log-sum-exp of notional
full logits: the K random top values plus the V-K others all one below the K-th, so that every
top-K probability exp(value - lse) is a valid one (below 1, summing below 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import build_inputs, load_processor, save_safetensors_deterministic  # noqa: E402
from trace import sha256_file, trace_metadata  # noqa: E402


def write(args) -> dict:
    import shutil

    from PIL import Image
    from transformers import AutoConfig, Qwen3VLForConditionalGeneration

    model_dir = Path(args.model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    processor = load_processor(model_dir)
    image, image_name, image_sha = None, "", ""
    if args.image:
        src = Path(args.image)
        dst = out.parent / src.name
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        image_name, image_sha = dst.name, sha256_file(dst)
        image = Image.open(dst)
        image.load()
    _, inputs = build_inputs(processor, args.prompt, image)
    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg)
    ids = inputs["input_ids"]
    pos, _ = model.model.get_rope_index(
        ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=None,
        attention_mask=None,
    )
    T = ids.shape[1]
    tc, vc = cfg.text_config, cfg.vision_config
    H, V, K, D = tc.hidden_size, tc.vocab_size, args.top_k, args.decode_steps
    gen = torch.Generator().manual_seed(args.seed)

    def noise(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def top(n):
        vals = noise(n, K).sort(dim=-1, descending=True).values * 4.0
        idx = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(n)])
        return idx.to(torch.int64), vals

    def lse(vals):
        # notional full logits: the K values, and V-K more at (K-th value - 1)
        v = vals.double()
        rest = (v[:, -1:] - 1.0) + torch.log(torch.tensor(float(V - K), dtype=torch.float64))
        return torch.logsumexp(torch.cat([v, rest], dim=-1), dim=-1)

    t = {"input_ids": ids[0].to(torch.int64), "position_ids": pos[:, 0, :].to(torch.int64)}
    if image is not None:
        P = inputs["pixel_values"].shape[0]
        N = P // (vc.spatial_merge_size**2)
        t["pixel_values"] = inputs["pixel_values"].to(torch.float32)
        t["image_grid_thw"] = inputs["image_grid_thw"].to(torch.int64).reshape(1, 3)
        t["vision.embed"] = noise(P, vc.hidden_size)
        for j in range(vc.depth):
            t[f"vision.block.{j}"] = noise(P, vc.hidden_size)
        t["vision.merger"] = noise(N, vc.out_hidden_size)
        for k in range(len(vc.deepstack_visual_indexes)):
            t[f"vision.deepstack.{k}"] = noise(N, vc.out_hidden_size)
    t["text.embed"] = noise(T, H)
    for i in range(tc.num_hidden_layers):
        t[f"text.layer.{i}"] = noise(T, H)
    t["text.norm"] = noise(T, H)
    t["logits.top_ids"], t["logits.top_values"] = top(T)
    t["decode.top_ids"], t["decode.top_values"] = top(D)
    t["decode.tokens"] = t["decode.top_ids"][:, 0].clone()
    t["logits.lse"] = lse(t["logits.top_values"])
    t["decode.lse"] = lse(t["decode.top_values"])
    t = {k: v.contiguous() for k, v in t.items()}
    meta = trace_metadata(
        "shape-only:" + model_dir.resolve().name,
        "",
        args.prompt,
        image_name,
        image_sha,
        D,
        mode="none",
        oracle="shape-only",
    )
    tmp = out.with_name(out.name + ".tmp")
    save_safetensors_deterministic(tmp, t, meta)
    tmp.replace(out)
    return {
        "out": str(out),
        "T": T,
        "image_tokens": int((ids == cfg.image_token_id).sum()),
        "bytes": out.stat().st_size,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (HF layout)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--image")
    ap.add_argument("--out", required=True)
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    print(json.dumps(write(ap.parse_args(argv))))


if __name__ == "__main__":
    main()
