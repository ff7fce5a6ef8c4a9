#!/usr/bin/env python3
"""Write a `qwen3vl-oracle-trace/2` file: what fp32 Hugging Face computes for one prompt.

    python oracle/trace.py --model DIR --prompt TEXT [--image PATH] --out FILE.safetensors \
        [--decode-steps 24] [--top-k 64] [--full-logits] [--model-id ID] [--revision SHA] \
        [--stream-layers] [--cross-check | --no-cross-check]

The format is specified in docs/oracle-trace.md. The model runs in fp32 on the
checkpoint's bf16 values (`dtype=torch.float32`, `attn_implementation="eager"`); the
prompt ids come from the checkpoint's chat template and Qwen3VLProcessor (image path
only, with Qwen2VLImageProcessorPil built from preprocessor_config.json, since the
oracle has no torchvision); per-layer states are captured with forward hooks that
clone what they see; greedy decoding uses HF generate with eos never stopping it.
Version 2 adds the float64 log-sum-exp of every logits row (`logits.lse`, `decode.lse`).

`--stream-layers` builds the same HF model on the meta device and loads each decoder
layer and ViT block from the shards just before it runs (LayerStreamer), so an 8B runs
in fp32 on a 16 GB machine; its traces are bit-identical to whole-model ones.

Nothing here is specific to the fixtures: it runs unchanged on a real Qwen3-VL folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

# libgomp's default busy-waiting is 5-8x slower on shared cores; results do not change.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (  # noqa: E402
    build_conversation_inputs,
    greedy_decode,
    load_processor,
    save_safetensors_deterministic,
    user_messages,
)

FORMAT = "qwen3vl-oracle-trace/2"
# metadata `oracle` (docs/oracle-trace.md); `oracle_mode` is "whole" or "layer-streamed"
ORACLE = "transformers"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def guess_revision(model_dir: Path) -> str:
    """The HF commit when the folder is a hub-cache snapshot (.../snapshots/<sha>/), else ''."""
    parts = model_dir.resolve().parts
    if len(parts) >= 2 and parts[-2] == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", parts[-1]):
        return parts[-1]
    return ""


def guess_model_id(model_dir: Path) -> str:
    """'org/name' for a hub-cache snapshot (models--org--name/snapshots/sha), else the folder name."""
    parts = model_dir.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/")
    return model_dir.resolve().name


def trace_metadata(
    model: str,
    revision: str,
    prompt: str,
    image: str,
    image_sha: str,
    steps: int,
    mode: str = "whole",
    oracle: str = ORACLE,
) -> dict:
    """The trace's `__metadata__` (docs/oracle-trace.md): v1's keys, then `oracle` and `oracle_mode`."""
    import transformers

    return {
        "format": FORMAT,
        "model": model,
        "revision": revision,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "dtype": "float32",
        "attn": "eager",
        "prompt": prompt,
        "image": image,
        "image_sha256": image_sha,
        "decode_steps": str(steps),
        "oracle": oracle,
        "oracle_mode": mode,
    }


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class ShardReader:
    """Tensors of a safetensors checkpoint (one file or an index of shards), read as fp32.

    Plain positioned reads, no mmap: a mapped shard's touched pages would count in the
    process's RSS, and streaming a 16 GB checkpoint would then look like a 16 GB process.
    The bf16 -> fp32 widening is exact (`.to(torch.float32)` / `copy_`), as in from_pretrained.
    """

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        self.entries: dict[str, tuple] = {}
        self.fds: dict[str, int] = {}
        for name in files:
            path = model_dir / name
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self.fds[name] = os.open(path, os.O_RDONLY)
            header.pop("__metadata__", None)
            for key, e in header.items():
                if e["dtype"] not in _ST_DTYPES:
                    raise RuntimeError(f"{path}: {key} has dtype {e['dtype']}, expected BF16/F16/F32")
                a, b = e["data_offsets"]
                self.entries[key] = (name, e["dtype"], tuple(e["shape"]), 8 + n + a, b - a)
        self.staging = bytearray(0)

    def _pread(self, key: str, buf) -> None:
        name, _, _, start, size = self.entries[key]
        view, done = memoryview(buf).cast("B")[:size], 0
        while done < size:  # preadv may return short (e.g. above 2 GiB)
            got = os.preadv(self.fds[name], [view[done:]], start + done)
            if got <= 0:
                raise RuntimeError(f"{name}: short read of {key}")
            done += got

    def read(self, key: str) -> torch.Tensor:
        """A new fp32 tensor (for the resident weights)."""
        out = torch.empty(self.entries[key][2], dtype=torch.float32)
        self.read_into(key, out)
        return out

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill `out` (fp32, contiguous, the tensor's shape) without allocating: streamed layers
        reuse the same storage, since fresh multi-GB allocations per layer cost page faults."""
        _, dtype, shape, _, size = self.entries[key]
        if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise RuntimeError(f"{key}: checkpoint shape {shape}, model {tuple(out.shape)}")
        if size == 0:
            return
        if dtype == "F32":
            self._pread(key, out.numpy())
            return
        if len(self.staging) < size:
            self.staging = bytearray(size)
        self._pread(key, self.staging)
        src = torch.frombuffer(self.staging, dtype=_ST_DTYPES[dtype], count=out.numel())
        out.copy_(src.reshape(shape))


def _set_param(module, name: str, value: torch.Tensor) -> None:
    """Replace parameter `name` (dotted, relative to `module`) with `value`."""
    owner, _, attr = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    sub._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)


class LayerStreamer:
    """Swaps the weights of decoder layers and ViT blocks in just before they run and out after.

    A forward pre-hook (prepended, so it runs before any capture hook) fills every parameter of
    the module from the shards in fp32; a forward hook puts meta tensors back. The fp32 storage
    is one set per kind of module ("vision", "text"), reused by every block of that kind: blocks
    run one after another, and a released block holds no reference to it. The module's own
    forward is HF's, unchanged; each decode step streams the layers again.
    """

    def __init__(self, reader: ShardReader, modules: list[tuple[str, str, torch.nn.Module]]):
        self.reader = reader
        self.handles = []
        self.loads = 0
        self.slots: dict[tuple[str, str], torch.Tensor] = {}
        for kind, prefix, mod in modules:
            self.handles.append(mod.register_forward_pre_hook(self._loader(kind, prefix), prepend=True))
            self.handles.append(mod.register_forward_hook(self._releaser()))

    def drop_buffers(self) -> None:
        """Free the reused fp32 storage and the read buffer (the next load allocates them again)."""
        self.slots.clear()
        self.reader.staging = bytearray(0)

    def _loader(self, kind: str, prefix: str):
        def hook(mod, args):
            for name, p in list(mod.named_parameters()):
                slot = self.slots.get((kind, name))
                if slot is None or slot.shape != p.shape:
                    slot = self.slots[(kind, name)] = torch.empty(p.shape, dtype=torch.float32)
                self.reader.read_into(prefix + name, slot)
                _set_param(mod, name, slot)
            self.loads += 1

        return hook

    def _releaser(self):
        def hook(mod, args, out):
            for name, p in list(mod.named_parameters()):
                _set_param(mod, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

        return hook


def load_streamed_model(model_dir: Path):
    """Qwen3VLForConditionalGeneration (fp32, eager) built on the meta device, streamed per layer.

    Resident (loaded now, as from_pretrained would): everything outside the decoder layers and
    ViT blocks (embeddings, patch and position embeddings, mergers, norms, lm_head or its tie).
    The rotary inv_freq buffers are recomputed by HF's `_init_weights`, as from_pretrained does.
    """
    from transformers import AutoConfig, GenerationConfig, Qwen3VLForConditionalGeneration
    from transformers import initialization as hf_init

    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"), hf_init.meta_device_safe_creation_ops():
        model = Qwen3VLForConditionalGeneration._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    inner = model.model
    streamed = [("vision", f"model.visual.blocks.{j}.", b) for j, b in enumerate(inner.visual.blocks)]
    streamed += [
        ("text", f"model.language_model.layers.{i}.", layer) for i, layer in enumerate(inner.language_model.layers)
    ]
    for _, prefix, mod in streamed:
        if list(mod.buffers()):
            raise RuntimeError(f"{prefix}: streamed modules must hold parameters only")
    reader = ShardReader(model_dir)
    prefixes = tuple(p for _, p, _ in streamed)
    wanted = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = set()
    for name in sorted(wanted):
        if name.startswith(prefixes):
            if name not in reader.entries:
                raise RuntimeError(f"{model_dir}: checkpoint has no {name}")
        elif name in reader.entries:
            _set_param(model, name, reader.read(name))
        else:
            missing.add(name)
    unexpected = sorted(set(reader.entries) - wanted)
    if unexpected:
        raise RuntimeError(f"{model_dir}: unexpected checkpoint tensors, e.g. {unexpected[:3]}")
    model.tie_weights(missing_keys=missing, recompute_mapping=False)
    for mod in model.modules():  # rotary inv_freq: non-persistent, recomputed like from_pretrained does
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            for bname, b in list(mod.named_buffers(recurse=False)):
                mod._buffers[bname] = torch.empty(b.shape, dtype=b.dtype)
            model._init_weights(mod)
    still_meta = [
        n
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if t.is_meta and not n.startswith(prefixes)
    ]
    if still_meta:
        raise RuntimeError(f"{model_dir}: no value for {still_meta[:3]}")
    if (model_dir / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    model._q3vl_streamer = LayerStreamer(reader, streamed)
    return model


def lse_f64(logits: torch.Tensor) -> torch.Tensor:
    """log-sum-exp over the whole vocabulary of each row of fp32 logits [n, V], in float64 -> [n]."""
    return torch.logsumexp(logits.to(torch.float32).double(), dim=-1).contiguous()


class Capture:
    """Forward hooks on the vision tower and the decoder that clone what they see."""

    def __init__(self, model):
        self.t: dict[str, torch.Tensor] = {}
        self.handles = []
        inner = model.model
        vis = inner.visual
        lm = inner.language_model
        self.depth = len(vis.blocks)
        self.n_deepstack = len(vis.deepstack_merger_list)
        self.n_layers = len(lm.layers)

        def first_arg(name, squeeze_batch):
            def hook(mod, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                self._put(name, x, squeeze_batch)

            return hook

        def output(name, squeeze_batch):
            def hook(mod, args, out):
                y = out[0] if isinstance(out, (tuple, list)) else out
                self._put(name, y, squeeze_batch)

            return hook

        def rope_positions(mod, args, kwargs):
            pos = args[1] if len(args) > 1 else kwargs["position_ids"]
            self.t["_rope_position_ids"] = pos.detach().clone()

        self.handles.append(vis.blocks[0].register_forward_pre_hook(first_arg("vision.embed", False), with_kwargs=True))
        for j, blk in enumerate(vis.blocks):
            self.handles.append(blk.register_forward_hook(output(f"vision.block.{j}", False)))
        self.handles.append(vis.merger.register_forward_hook(output("vision.merger", False)))
        for k, m in enumerate(vis.deepstack_merger_list):
            self.handles.append(m.register_forward_hook(output(f"vision.deepstack.{k}", False)))
        self.handles.append(lm.layers[0].register_forward_pre_hook(first_arg("text.embed", True), with_kwargs=True))
        for i, layer in enumerate(lm.layers[1:], start=1):
            # inputs of layers 1.. (not written): used to check that text.layer.{i} is pre-DeepStack
            self.handles.append(layer.register_forward_pre_hook(first_arg(f"_input.{i}", True), with_kwargs=True))
        for i, layer in enumerate(lm.layers):
            # the layer's own output: DeepStack is added afterwards by the text model
            self.handles.append(layer.register_forward_hook(output(f"text.layer.{i}", True)))
        self.handles.append(lm.norm.register_forward_hook(output("text.norm", True)))
        self.handles.append(lm.rotary_emb.register_forward_pre_hook(rope_positions, with_kwargs=True))

    def _put(self, name, x, squeeze_batch):
        if name in self.t:
            raise RuntimeError(f"hook {name} fired twice in one forward pass")
        x = x.detach()
        if squeeze_batch:
            if x.shape[0] != 1:
                raise RuntimeError(f"{name}: batch {x.shape[0]}, expected 1")
            x = x[0]
        self.t[name] = x.to(torch.float32).clone().contiguous()

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def write_trace(args) -> dict:
    from PIL import Image
    from transformers import Qwen3VLForConditionalGeneration

    model_dir = Path(args.model)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    processor = load_processor(model_dir)
    images, image_names, shas = [], [], []
    for path in args.image:
        src = Path(path)
        dst = out_path.parent / src.name
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        image_names.append(dst.name)
        shas.append(sha256_file(dst))
        img = Image.open(dst)
        img.load()
        images.append(img)
    if args.messages:
        messages = json.loads(Path(args.messages).read_text())
        parts = [p for m in messages if isinstance(m["content"], list) for p in m["content"]]
        if sum(p.get("type") == "image" for p in parts) != len(images):
            raise SystemExit("--messages must hold one image part per --image")
        prompt = next(p["text"] for p in reversed(parts) if p.get("type") == "text")
    else:
        messages = user_messages(args.prompt, False)
        messages[0]["content"][:0] = [{"type": "image"}] * len(images)
        prompt = args.prompt
    text, inputs = build_conversation_inputs(processor, messages, images)
    image = images or None

    if args.stream_layers:
        model = load_streamed_model(model_dir)
    else:
        model = Qwen3VLForConditionalGeneration.from_pretrained(
            str(model_dir), dtype=torch.float32, attn_implementation="eager"
        )
    model.eval()
    if model.dtype != torch.float32:
        raise RuntimeError(f"model loaded as {model.dtype}")
    cfg = model.config

    input_ids = inputs["input_ids"]
    T = input_ids.shape[1]
    mm = inputs["mm_token_type_ids"]
    n_img_tokens = int((input_ids == cfg.image_token_id).sum())
    if image is not None:
        merge = cfg.vision_config.spatial_merge_size
        expect = int(inputs["image_grid_thw"].prod(dim=-1).sum()) // (merge * merge)
        if n_img_tokens != expect:
            raise RuntimeError(f"{n_img_tokens} image tokens in the prompt, the grid gives {expect}")
        if not torch.equal(mm, (input_ids == cfg.image_token_id).to(mm.dtype)):
            raise RuntimeError("mm_token_type_ids is not 1 exactly at the image-pad positions")
    elif n_img_tokens:
        raise RuntimeError("text-only prompt contains image tokens")

    # position ids from HF get_rope_index ([3, 1, T] -> [3, T])
    with torch.no_grad():
        pos, _deltas = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=None,
            attention_mask=None,
        )
    position_ids = pos[:, 0, :].to(torch.int64).contiguous()

    # prompt forward with hooks
    cap = Capture(model)
    try:
        model.model.rope_deltas = None
        with torch.no_grad():
            out = model(**inputs, use_cache=False, logits_to_keep=0)
    finally:
        cap.remove()
    logits = out.logits[0].to(torch.float32).contiguous()  # [T, V]
    used = cap.t.pop("_rope_position_ids")
    used = used.reshape(used.shape[0], -1, used.shape[-1])[-3:, 0, :]
    if not torch.equal(used.to(torch.int64), position_ids):
        raise RuntimeError("the positions the model used differ from get_rope_index")

    # text.layer.i is the layer's own output: the next layer's input is it plus DeepStack i
    # at the image rows (i < number of taps), and exactly it elsewhere.
    img_rows = input_ids[0] == cfg.image_token_id
    for i in range(1, cap.n_layers):
        nxt = cap.t.pop(f"_input.{i}")
        prev = cap.t[f"text.layer.{i - 1}"].clone()
        if image is not None and i - 1 < cap.n_deepstack:
            prev[img_rows] = prev[img_rows] + cap.t[f"vision.deepstack.{i - 1}"]
        if not torch.equal(nxt, prev):
            raise RuntimeError(f"input of decoder layer {i} != text.layer.{i - 1} (+ DeepStack {i - 1})")

    K = args.top_k
    V = logits.shape[-1]
    if not 2 <= K <= V:
        raise SystemExit(f"--top-k must be in 2..{V}")
    top = torch.topk(logits, K, dim=-1, largest=True, sorted=True)

    # greedy decode, eos not stopping it
    model.model.rope_deltas = None
    # the manual KV-cache loop doubles the decode time; streamed runs skip it unless --cross-check
    cross_check = args.cross_check if args.cross_check is not None else not args.stream_layers
    dec_tokens, dec_logits = greedy_decode(model, inputs, args.decode_steps, cross_check=cross_check)
    if args.stream_layers:
        model._q3vl_streamer.drop_buffers()  # no layer runs after this: lowers the peak while writing
    if args.decode_steps and not torch.allclose(dec_logits[0], logits[-1], rtol=1e-4, atol=1e-4):
        raise RuntimeError("generate's first step disagrees with the prompt forward's last logits")
    dtop = torch.topk(dec_logits, K, dim=-1, largest=True, sorted=True)

    tensors: dict[str, torch.Tensor] = {
        "input_ids": input_ids[0].to(torch.int64),
        "position_ids": position_ids,
    }
    if image is not None:
        tensors["pixel_values"] = inputs["pixel_values"].to(torch.float32)
        tensors["image_grid_thw"] = inputs["image_grid_thw"].to(torch.int64).reshape(-1, 3)
        names = (
            ["vision.embed"]
            + [f"vision.block.{j}" for j in range(cap.depth)]
            + ["vision.merger"]
            + [f"vision.deepstack.{k}" for k in range(cap.n_deepstack)]
        )
        for n in names:
            tensors[n] = cap.t[n]
    tensors["text.embed"] = cap.t["text.embed"]
    for i in range(cap.n_layers):
        tensors[f"text.layer.{i}"] = cap.t[f"text.layer.{i}"]
    tensors["text.norm"] = cap.t["text.norm"]
    tensors["logits.top_ids"] = top.indices.to(torch.int64)
    tensors["logits.top_values"] = top.values.to(torch.float32)
    tensors["logits.lse"] = lse_f64(logits)
    if args.full_logits:
        tensors["logits"] = logits
    tensors["decode.tokens"] = dec_tokens.to(torch.int64)
    tensors["decode.top_ids"] = dtop.indices.to(torch.int64)
    tensors["decode.top_values"] = dtop.values.to(torch.float32)
    tensors["decode.lse"] = lse_f64(dec_logits)
    if args.full_logits:
        tensors["decode.logits"] = dec_logits.to(torch.float32)
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}

    # shape checks against the format (docs/oracle-trace.md)
    H = cfg.text_config.hidden_size
    for n in ["text.embed", "text.norm"] + [f"text.layer.{i}" for i in range(cap.n_layers)]:
        assert tuple(tensors[n].shape) == (T, H), (n, tensors[n].shape)
    if image is not None:
        P = tensors["pixel_values"].shape[0]
        Dv = cfg.vision_config.hidden_size
        Do = cfg.vision_config.out_hidden_size
        assert tensors["vision.embed"].shape == (P, Dv)
        assert tensors["vision.merger"].shape == (P // 4, Do)
        assert n_img_tokens == P // 4
    assert tensors["logits.top_ids"].shape == (T, K)
    assert tensors["logits.lse"].shape == (T,) and tensors["logits.lse"].dtype == torch.float64
    assert tensors["decode.lse"].shape == (args.decode_steps,) and tensors["decode.lse"].dtype == torch.float64

    metadata = trace_metadata(
        args.model_id or guess_model_id(model_dir),
        args.revision if args.revision is not None else guess_revision(model_dir),
        prompt,
        "\n".join(image_names),
        "\n".join(shas),
        args.decode_steps,
        mode="layer-streamed" if args.stream_layers else "whole",
    )
    if args.messages:
        metadata["messages"] = json.dumps(messages, ensure_ascii=False)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_safetensors_deterministic(tmp, tensors, metadata)
    tmp.replace(out_path)

    margins = (tensors["decode.top_values"][:, 0] - tensors["decode.top_values"][:, 1]).tolist()
    pmarg = (tensors["logits.top_values"][:, 0] - tensors["logits.top_values"][:, 1]).tolist()
    summary = {
        "out": str(out_path),
        "T": T,
        "patches": int(tensors["pixel_values"].shape[0]) if image is not None else 0,
        "image_tokens": n_img_tokens,
        "firm_decode_steps": sum(m >= 0.1 for m in margins),
        "decode_steps": args.decode_steps,
        "firm_prompt_positions": sum(m >= 0.1 for m in pmarg),
        "decoded": processor.tokenizer.decode(dec_tokens.tolist()),
        "bytes": out_path.stat().st_size,
    }
    if args.stream_layers:
        summary["layer_loads"] = model._q3vl_streamer.loads
    summary["cross_check"] = bool(cross_check and args.decode_steps)
    return summary


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (HF layout)")
    ap.add_argument("--prompt", help="the user text (one user turn: the images, then the text)")
    ap.add_argument(
        "--messages",
        help='a JSON file holding a whole conversation (HF chat messages; an {"type": "image"} part '
        "stands for each --image, in order) instead of --prompt",
    )
    ap.add_argument(
        "--image", action="append", default=[], help="image file (repeat for several); copied next to the trace"
    )
    ap.add_argument("--out", required=True, help="output .safetensors")
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--full-logits", action="store_true", help="also store logits [T,V] and decode.logits [D,V]")
    ap.add_argument("--model-id", help="metadata 'model' (default: hub id of a cache snapshot, else the folder name)")
    ap.add_argument("--revision", help="metadata 'revision' (default: the snapshot sha when known, else empty)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--stream-layers",
        action="store_true",
        help="layer-streamed: build the model on the meta device, keep embeddings, norms, mergers and "
        "head resident, load each decoder layer and ViT block from the shards just before it runs "
        "and drop it after (8B in fp32 within ~10 GB)",
    )
    ap.add_argument(
        "--cross-check",
        dest="cross_check",
        action="store_true",
        default=None,
        help="re-run the decode as a manual KV-cache loop (default: on, off with --stream-layers)",
    )
    ap.add_argument(
        "--no-cross-check",
        dest="cross_check",
        action="store_false",
        help="skip the manual KV-cache re-run of the decode (saves time on big models)",
    )
    args = ap.parse_args(argv)
    if (args.prompt is None) == (args.messages is None):
        ap.error("give exactly one of --prompt and --messages")
    t0 = time.time()
    summary = write_trace(args)
    summary["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    main()
