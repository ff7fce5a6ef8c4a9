"""Shared helpers of the q3vl Python oracle (fixture builder, trace writer, quantization checker).

Nothing here is fixture-specific: `load_processor` and `build_inputs` work on a
real Qwen3-VL checkpoint folder as well as on the tiny fixtures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ORACLE_DIR = Path(__file__).resolve().parent
REPO_DIR = ORACLE_DIR.parent
FIXTURES_DIR = REPO_DIR / "fixtures"
# The Qwen3-VL Instruct chat template (Qwen/Qwen3-VL-8B-Instruct, Apache-2.0),
# 5292 bytes, sha256 3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4.
CHAT_TEMPLATE_PATH = REPO_DIR / "model" / "data" / "qwen3_vl_chat_template.jinja"
CHAT_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"

# Qwen's special tokens, in Qwen's id order (151643 .. 151656 in the real vocab).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def read_chat_template() -> str:
    import hashlib

    data = CHAT_TEMPLATE_PATH.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != CHAT_TEMPLATE_SHA256:
        raise SystemExit(f"{CHAT_TEMPLATE_PATH} changed (sha256 {digest}); expected {CHAT_TEMPLATE_SHA256}")
    return data.decode("utf-8")


def user_messages(prompt: str, with_image: bool) -> list[dict]:
    """One user turn: [image] + text, the way Qwen documents it (image part first)."""
    content = []
    if with_image:
        content.append({"type": "image"})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def _image_only_processor_class():
    """Qwen3VLProcessor without its video processor.

    The video processor needs torchvision, which the oracle does not install. The
    image path of Qwen3VLProcessor (chat-template text -> <|image_pad|> expansion ->
    tokenization -> mm_token_type_ids) is used unchanged.
    """
    from transformers import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    return ImageOnlyQwen3VLProcessor


def load_image_processor(model_dir: str | Path):
    """Qwen2VLImageProcessorPil built from the checkpoint's preprocessor_config.json."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    cfg = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
    allowed = {
        "do_resize",
        "size",
        "resample",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
        "patch_size",
        "temporal_patch_size",
        "merge_size",
        "min_pixels",
        "max_pixels",
    }
    kwargs = {k: v for k, v in cfg.items() if k in allowed}
    return Qwen2VLImageProcessorPil(**kwargs)


def load_processor(model_dir: str | Path, tokenizer=None):
    from transformers import AutoTokenizer

    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not tokenizer.chat_template:
        # older layouts keep it processor-side only
        jinja = Path(model_dir) / "chat_template.jinja"
        js = Path(model_dir) / "chat_template.json"
        if jinja.exists():
            tokenizer.chat_template = jinja.read_text()
        elif js.exists():
            tokenizer.chat_template = json.loads(js.read_text())["chat_template"]
        else:
            raise SystemExit(f"{model_dir}: no chat template (tokenizer_config.json, chat_template.jinja/.json)")
    cls = _image_only_processor_class()
    return cls(
        image_processor=load_image_processor(model_dir), tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def build_inputs(processor, prompt: str, image=None):
    """Chat template + processor, exactly as HF does it; returns (text, BatchFeature of torch tensors).

    For an image prompt the result carries input_ids, attention_mask, mm_token_type_ids,
    pixel_values and image_grid_thw; for a text prompt input_ids, attention_mask and
    mm_token_type_ids (all zero).
    """
    images = [] if image is None else [image]
    return build_conversation_inputs(processor, user_messages(prompt, image is not None), images)


def build_conversation_inputs(processor, messages: list[dict], images: list):
    """`build_inputs` for a whole conversation (HF chat messages, `{"type": "image"}` parts
    standing for `images` in order)."""
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not images:
        inputs = processor(text=[text], return_tensors="pt")
    else:
        inputs = processor(text=[text], images=images, return_tensors="pt")
    return text, inputs


def greedy_decode(model, inputs, steps: int, cross_check: bool = True):
    """Greedy continuation of `steps` tokens with HF generate, eos never stopping it.

    Returns (tokens [D] int64, logits [D, V] float32): the raw logits (before any logits
    processor) that chose each token.

    transformers 5.23 fills an unset (None) eos_token_id of the GenerationConfig passed to
    generate from the model's own generation_config, so `eos_token_id=None` together with
    `min_new_tokens=D` does NOT disable eos: MinNewTokensLengthLogitsProcessor sets the eos
    logits to -inf and greedy picks the runner-up whenever eos is the argmax. The model's
    generation_config is therefore blanked for the call, and every chosen token is asserted to
    be the argmax of its raw logits. With cross_check, a manual KV-cache loop over the model's
    forward (the positions coming from the model's cached rope_deltas) must agree.
    """
    import torch
    from transformers import GenerationConfig

    gen_cfg = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=steps,
        min_new_tokens=steps,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=True,
    )
    prompt_len = inputs["input_ids"].shape[1]
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        model.model.rope_deltas = None
        with torch.no_grad():
            out = model.generate(**inputs, generation_config=gen_cfg)
    finally:
        model.generation_config = saved
    tokens = out.sequences[0, prompt_len:].clone()
    logits = torch.stack([step[0] for step in out.logits]).float()
    if tokens.shape[0] != steps or logits.shape[0] != steps:
        raise RuntimeError(f"generate returned {tokens.shape[0]} tokens / {logits.shape[0]} logits, wanted {steps}")
    if not torch.equal(logits.argmax(-1), tokens):
        bad = int((logits.argmax(-1) != tokens).nonzero()[0, 0])
        raise RuntimeError(f"decode step {bad}: token {int(tokens[bad])} is not the argmax of its raw logits")
    if cross_check and steps:
        manual_tokens, manual_logits = manual_greedy(model, inputs, steps)
        top2 = logits.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).tolist()
        for j in range(steps):
            if int(manual_tokens[j]) != int(tokens[j]) or not torch.allclose(
                manual_logits[j], logits[j], rtol=1e-4, atol=1e-4
            ):
                if margin[j] < 1e-3:
                    print(
                        f"warning: generate and the manual loop part at near-tie step {j} "
                        f"(margin {margin[j]:.2e}); the trace keeps generate's tokens",
                        file=sys.stderr,
                    )
                    break
                raise RuntimeError(f"decode step {j}: generate and the manual KV-cache loop disagree")
    return tokens, logits


def manual_greedy(model, inputs, steps: int):
    """Prefill + one token at a time through the model's forward with a KV cache."""
    import torch

    model.model.rope_deltas = None
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = out.past_key_values
        step_logits = [out.logits[0, -1].float()]
        tokens = [int(step_logits[-1].argmax())]
        for _ in range(steps - 1):
            nxt = torch.tensor([[tokens[-1]]], dtype=inputs["input_ids"].dtype)
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            step_logits.append(out.logits[0, -1].float())
            tokens.append(int(step_logits[-1].argmax()))
    model.model.rope_deltas = None
    return torch.tensor(tokens, dtype=torch.int64), torch.stack(step_logits)


def save_safetensors_deterministic(path, tensors: dict, metadata: dict) -> None:
    """Write a .safetensors file byte-for-byte reproducibly.

    safetensors' own writer keeps __metadata__ in a hash map, so the header's key order (and
    the file's bytes) change from run to run. Here: metadata keys in the given order, tensors
    sorted by name, data contiguous little-endian in that order, header padded with spaces to
    a multiple of 8 bytes (as safetensors does)."""
    import torch

    dtypes = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.int64: "I64",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int8: "I8",
        torch.int32: "I32",
        torch.uint8: "U8",
    }
    raw = {}
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        raw[name] = (dtypes[t.dtype], t.shape, data)
    meta = {str(k): str(v) for k, v in metadata.items()}
    write_safetensors(path, raw, meta, ensure_ascii=False)


def write_safetensors(
    path, tensors: dict[str, tuple[str, tuple, bytes]], metadata: dict | None = None, ensure_ascii: bool = True
) -> None:
    """Write a .safetensors file from raw bytes: `tensors` maps a name to (dtype, shape,
    little-endian data). The header holds `metadata` (if any) first, then the tensors sorted
    by name, padded with spaces to a multiple of 8 bytes (as safetensors does); the data
    follows, contiguous in that order."""
    import struct

    header = {} if metadata is None else {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=ensure_ascii).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def centered_cos(a, b) -> float:
    """Cosine of two logit rows after removing each one's mean, in float64: a shift common
    to every logit (which softmax ignores) cannot make two rows look alike."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def report(out: dict, faults: list[str]) -> int:
    """Prints a check's JSON summary (with its faults and verdict) on stdout and the first
    fault on stderr; returns the exit code: 1 on a fault, else 0."""
    print(json.dumps({**out, "faults": faults, "passed": not faults}, indent=2))
    if faults:
        print(f"FAIL: {faults[0]} ({len(faults)} fault(s))", file=sys.stderr)
        return 1
    return 0
