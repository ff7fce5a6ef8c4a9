#!/usr/bin/env python3
"""Build the tiny Qwen3-VL checkpoints committed under fixtures/.

    python oracle/build_fixtures.py [shapes] [tied] [odd] [--traces-only] [--steps N]

Every fixture is a real `transformers.Qwen3VLForConditionalGeneration` saved in the
Hugging Face layout (model.safetensors in bf16, config.json, generation_config.json,
preprocessor_config.json, tokenizer.json, tokenizer_config.json with "chat_template"
plus chat_template.jinja), with its own small byte-level BPE tokenizer that carries
Qwen's special tokens. After building, the fixture's two oracle traces are written
with oracle/trace.py (the exact commands are printed and recorded in the README).

- shapes: trained on a synthetic image -> text task (colour, shape, quadrant) and a
  text-only task; accuracy measured on fresh renders with HF greedy generate.
- tied:   untrained, tied embeddings (no lm_head.weight in the file), weights scaled
  so that every sublayer moves the residual stream a lot and logits have clear
  margins; its image needs a bicubic resize (100x150 -> 96x160).
- odd:    untrained, a deliberately different shape (one DeepStack tap, no GQA,
  head_dim 24, non-square image without resize).

Seeds are fixed (see SEEDS); rerunning gives the same files on the same machine and
thread count (CPU float reductions may differ across machines).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# libgomp's default busy-waiting collapses throughput when the 2 cores are shared with
# other work (5-8x slower); passive waiting changes no result.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    FIXTURES_DIR,
    REPO_DIR,
    SPECIAL_TOKENS,
    build_inputs,
    greedy_decode,
    load_processor,
    read_chat_template,
)
from quant_sim import headroom_problems, mode_figures  # noqa: E402

SEEDS = {
    "shapes.init": 1,
    "shapes.train_data": 1000,
    "shapes.eval_data": 2000,
    "shapes.demo_images": 3000,
    "tied.init": 11,
    "tied.image": 12,
    "odd.init": 21,
    "odd.image": 22,
}

DECODE_STEPS = 24
TOP_K = 16

# --------------------------------------------------------------------------------------
# fixture shapes


def vision_cfg(depth, hidden, inter, heads, npos, deepstack, out_hidden):
    return dict(
        depth=depth,
        hidden_size=hidden,
        intermediate_size=inter,
        num_heads=heads,
        patch_size=16,
        temporal_patch_size=2,
        spatial_merge_size=2,
        in_channels=3,
        out_hidden_size=out_hidden,
        num_position_embeddings=npos,
        deepstack_visual_indexes=list(deepstack),
        hidden_act="gelu_pytorch_tanh",
        initializer_range=0.02,
    )


def text_cfg(hidden, layers, heads, kv_heads, head_dim, inter, mrope_section):
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=inter,
        hidden_act="silu",
        max_position_embeddings=262144,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": list(mrope_section),
            "mrope_interleaved": True,
        },
        attention_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
    )


SHAPES_IMAGE_PROMPT = "What is in the image?"
SHAPES_TEXT_PROMPT = "Which colour comes after blue?"

SPECS = {
    "shapes": dict(
        vision=vision_cfg(4, 64, 128, 2, 256, [1, 2, 3], 64),
        text=text_cfg(64, 4, 4, 2, 32, 192, [6, 5, 5]),
        tie=False,
        min_pixels=65536,
        max_pixels=16777216,
        # config.json spelled like the published Qwen3-VL checkpoints (transformers 4.57):
        # text_config.rope_theta + text_config.rope_scaling, vision model_type "qwen3_vl".
        config_style="hub",
        bpe_vocab=400,
        image_prompt=SHAPES_IMAGE_PROMPT,
        text_prompt=SHAPES_TEXT_PROMPT,
    ),
    "tied": dict(
        vision=vision_cfg(5, 32, 64, 2, 64, [0, 2, 4], 96),
        text=text_cfg(96, 5, 6, 2, 16, 160, [4, 2, 2]),
        tie=True,
        min_pixels=4096,
        max_pixels=262144,
        # config.json as transformers 5.23 writes it: text_config.rope_parameters.
        config_style="hf5",
        bpe_vocab=420,
        image_size=(150, 100),  # (w, h): smart_resize -> 160 x 96, a real bicubic resize
        image_prompt="Describe this picture.",
        text_prompt="Tell me a story about a red fox.",
        # 5 layers at 1.0x amplify int8 rounding past the ladder gate (1 - cos ~1.5e-3 at layer 4)
        update_target=0.7,
    ),
    "odd": dict(
        vision=vision_cfg(2, 48, 96, 3, 144, [1], 32),
        text=text_cfg(32, 2, 2, 2, 24, 64, [4, 4, 4]),
        tie=False,
        min_pixels=1024,
        max_pixels=262144,
        config_style="hf5",
        bpe_vocab=300,
        image_size=(128, 64),  # (w, h): already a multiple of 32, no resize
        image_prompt="What do you see?",
        text_prompt="Count to five.",
    ),
}

# --------------------------------------------------------------------------------------
# tokenizer


# Qwen2's pre-tokenizer split, one alternative per line (the pieces concatenate to one pattern).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)"""
    r"""|[^\r\n\p{L}\p{N}]?\p{L}+"""
    r"""|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+"""
    r"""|\s+(?!\S)"""
    r"""|\s+"""
)


def build_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE with Qwen2/Qwen3's normalizer, pre-tokenizer, decoder and post-processor."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(
        models.BPE(
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    return tok


def padded_vocab(tok) -> int:
    return int(math.ceil(tok.get_vocab_size() / 64) * 64)


def token_ids(tok) -> dict:
    return {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}


def write_tokenizer(tok, out: Path) -> None:
    """tokenizer.json (ours, Qwen-shaped) + what transformers writes, with "chat_template" in tokenizer_config.json."""
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    template = read_chat_template()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "tokenizer.json"
        tok.save(str(raw))
        hf_tok = PreTrainedTokenizerFast(
            tokenizer_file=str(raw),
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            additional_special_tokens=SPECIAL_TOKENS[1:],
            clean_up_tokenization_spaces=False,
            model_max_length=262144,
            errors="replace",
            split_special_tokens=False,
            add_prefix_space=False,
        )
        hf_tok.chat_template = template
        hf_tok.save_pretrained(str(out))
        # transformers rewrites the post-processor into a TemplateProcessing; keep Qwen's
        # ByteLevel one (same ids, the file the Rust side reads looks like Qwen's).
        shutil.copyfile(raw, out / "tokenizer.json")
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # transformers 5.23 writes the template to chat_template.jinja only; the published
    # checkpoints carry it in tokenizer_config.json. Keep both.
    cfg["chat_template"] = template
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg["add_bos_token"] = False
    cfg["added_tokens_decoder"] = {
        str(tok.token_to_id(s)): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for s in SPECIAL_TOKENS
    }
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_preprocessor(out: Path, min_pixels: int, max_pixels: int) -> None:
    cfg = {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "image_std": [0.5, 0.5, 0.5],
        "merge_size": 2,
        "patch_size": 16,
        "processor_class": "Qwen3VLProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"longest_edge": max_pixels, "shortest_edge": min_pixels},
        "temporal_patch_size": 2,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_generation_config(out: Path, ids: dict) -> None:
    import transformers

    cfg = {
        "bos_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "transformers_version": transformers.__version__,
    }
    (out / "generation_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------
# config and checkpoint


def make_config(spec: dict, tok):
    from transformers import Qwen3VLConfig

    ids = token_ids(tok)
    text = dict(spec["text"])
    text.update(
        vocab_size=padded_vocab(tok),
        tie_word_embeddings=spec["tie"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=dict(spec["vision"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["tie"],
    )


def to_hub_style(cfg: dict) -> dict:
    """Rewrite a transformers-5 config.json into the spelling of the published checkpoints."""
    tc = cfg["text_config"]
    rp = tc.pop("rope_parameters")
    tc["rope_theta"] = rp["rope_theta"]
    tc["rope_scaling"] = {
        "mrope_interleaved": rp.get("mrope_interleaved", True),
        "mrope_section": rp["mrope_section"],
        "rope_type": rp.get("rope_type", "default"),
    }
    vc = cfg["vision_config"]
    vc.pop("rope_parameters", None)
    vc["model_type"] = "qwen3_vl"
    return cfg


def save_model(model, out: Path, spec: dict, ids: dict) -> None:
    """model.safetensors in bf16 + config.json (+ our generation_config.json)."""
    from safetensors.torch import load_file

    model = model.to(torch.bfloat16)
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        if (out / name).exists():
            (out / name).unlink()
    model.save_pretrained(str(out))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if spec["config_style"] == "hub":
        cfg = to_hub_style(cfg)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_generation_config(out, ids)
    names = set(load_file(str(out / "model.safetensors")).keys())
    if spec["tie"] and "lm_head.weight" in names:
        raise RuntimeError("tied checkpoint still stores lm_head.weight")
    if not spec["tie"] and "lm_head.weight" not in names:
        raise RuntimeError("untied checkpoint lacks lm_head.weight")
    model.to(torch.float32)


def load_fp32(out: Path, attn: str = "eager"):
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32, attn_implementation=attn)
    model.eval()
    return model


def prepare_folder(name: str, tok, spec: dict) -> Path:
    out = FIXTURES_DIR / name
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(tok, out)
    write_preprocessor(out, spec["min_pixels"], spec["max_pixels"])
    # sanity: the transformers tokenizer loaded from disk agrees with ours
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(out))
    probe = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hello there, 12 foxes!<|im_end|>\n"
    if hf_tok(probe, add_special_tokens=True)["input_ids"] != tok.encode(probe).ids:
        raise RuntimeError(f"{name}: the saved tokenizer does not reproduce the trained one")
    return out


# --------------------------------------------------------------------------------------
# shapes: data


COLOURS = [("red", (215, 35, 35)), ("green", (30, 160, 50)), ("blue", (35, 70, 215)), ("yellow", (235, 195, 20))]
SHAPE_NAMES = ["square", "circle", "triangle"]
ROWS = ["top", "bottom"]
COLS = ["left", "right"]
TURN = "<|im_end|>\n<|im_start|>assistant\n"
# token index of each answer field in "a <colour> <shape> at the <row> <col>" (one token per word)
FIELD_POS = {"colour": 1, "shape": 2, "row": 5, "col": 6}


def render_shape(rng: np.random.Generator, size: int = 448, with_mask: bool = False):
    """A light plain background with one coloured shape in one quadrant; returns (PIL image, answer)
    (and the shape's mask as a bool array when with_mask)."""
    bg = tuple(int(v) for v in rng.integers(195, 256, size=3))
    ci = int(rng.integers(len(COLOURS)))
    si = int(rng.integers(len(SHAPE_NAMES)))
    ri = int(rng.integers(2))
    qi = int(rng.integers(2))
    cname, base = COLOURS[ci]
    colour = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in base)
    half = size // 2
    extent = int(rng.integers(120, 201))  # side / diameter in pixels
    margin = extent / 2 + 6
    cx = qi * half + rng.uniform(margin, half - margin)
    cy = ri * half + rng.uniform(margin, half - margin)
    img = Image.new("RGB", (size, size), bg)
    mask = Image.new("L", (size, size), 0)
    r = extent / 2
    shape = SHAPE_NAMES[si]
    for canvas, fill in ((img, colour), (mask, 255)):
        draw = ImageDraw.Draw(canvas)
        if shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            h = extent * math.sqrt(3) / 2
            draw.polygon([(cx, cy - h / 2), (cx - r, cy + h / 2), (cx + r, cy + h / 2)], fill=fill)
    answer = f"a {cname} {shape} at the {ROWS[ri]} {COLS[qi]}"
    if with_mask:
        return img, answer, np.asarray(mask) > 127, si
    return img, answer


def shapes_text_tasks() -> list[tuple[str, str]]:
    names = [c for c, _ in COLOURS]
    tasks = []
    for i, c in enumerate(names):
        tasks.append((f"Which colour comes after {c}?", names[(i + 1) % len(names)]))
    for c in names:
        for s in SHAPE_NAMES:
            tasks.append((f"Repeat: {c} {s}", f"{c} {s}"))
    return tasks


def shapes_corpus() -> list[str]:
    corpus = []
    for c, _ in COLOURS:
        for s in SHAPE_NAMES:
            for r in ROWS:
                for q in COLS:
                    corpus.append(f"a {c} {s} at the {r} {q}")
    for p, a in shapes_text_tasks():
        corpus += [p, a]
    corpus += [SHAPES_IMAGE_PROMPT, "user\n", "assistant\n", "system\n", "You are a helpful assistant."]
    return corpus * 4


def continuation_ids(tok, answer: str, length: int) -> list[int]:
    """answer<|im_end|>\\n<|im_start|>assistant\\n answer ... truncated to `length` tokens.

    The repeated turn makes every one of the D decode steps of a trace firm, and keeps
    the later steps image-dependent."""
    ids: list[int] = []
    while len(ids) < length:
        ids += tok.encode(answer + TURN).ids
    return ids[:length]


# --------------------------------------------------------------------------------------
# shapes: training and evaluation


def _batch(processor, tok, items, target_len, pad_id, rest_weight=1.0):
    """items: [(prompt, PIL image | None, answer)] -> model kwargs, labels, loss weights.

    The first `answer<|im_end|>` gets weight 1, the repeated turns after it rest_weight."""
    seqs, labels, weights, pix, grids, mm = [], [], [], [], [], []
    for prompt, image, answer in items:
        _, inp = build_inputs(processor, prompt, image)
        p_ids = inp["input_ids"][0].tolist()
        tgt = continuation_ids(tok, answer, target_len)
        seqs.append(p_ids + tgt)
        lab = [-100] * (len(p_ids) - 1) + tgt + [-100]
        labels.append(lab)
        n_ans = _answer_len(tok, answer)
        weights.append([0.0] * (len(p_ids) - 1) + [1.0] * n_ans + [rest_weight] * (len(tgt) - n_ans) + [0.0])
        mm.append(inp["mm_token_type_ids"][0].tolist() + [0] * len(tgt))
        if image is not None:
            pix.append(inp["pixel_values"])
            grids.append(inp["image_grid_thw"])
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    wts = torch.zeros((len(seqs), width), dtype=torch.float32)
    mmt = torch.zeros((len(seqs), width), dtype=torch.long)
    # One entry of each list per item, so the lengths always agree.
    for i, (s, lbl, w, m) in enumerate(zip(seqs, labels, weights, mm, strict=True)):
        # right padding: causal attention never lets a real token see the pads
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lbl)] = torch.tensor(lbl)
        wts[i, : len(w)] = torch.tensor(w)
        mmt[i, : len(m)] = torch.tensor(m)
    kwargs = {"input_ids": ids, "mm_token_type_ids": mmt}
    if pix:
        kwargs["pixel_values"] = torch.cat(pix)
        kwargs["image_grid_thw"] = torch.cat(grids)
    return kwargs, lab, wts


def _answer_len(tok, answer):
    return len(tok.encode(answer + "<|im_end|>").ids)


def _token_coverage(mask: np.ndarray, cell: int = 32) -> torch.Tensor:
    """Fraction of each merged image token (32x32 px, raster order) covered by the shape."""
    h, w = mask.shape
    cov = mask.reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3)).reshape(-1)
    return torch.from_numpy(cov.astype(np.float32))


def edge_init_patch_embed(model, gen: torch.Generator, n_dc: int = 16) -> None:
    """Start the patch embedding from oriented step-edge filters (random orientation and offset,
    random colour weights; equal over the two temporal slices) plus n_dc colour (constant)
    filters. With the default N(0, 0.02) start the tiny ViT took far longer to tell a circle from
    a square; this is only an initialisation, everything is trained afterwards."""
    w = model.model.visual.patch_embed.proj.weight  # [Dv, C, T, P, P]
    dv, c, t, p, _ = w.shape
    yy, xx = torch.meshgrid(
        torch.arange(p, dtype=torch.float32) - (p - 1) / 2,
        torch.arange(p, dtype=torch.float32) - (p - 1) / 2,
        indexing="ij",
    )
    with torch.no_grad():
        for k in range(dv):
            colour = torch.randn(c, generator=gen) * 0.3 + 1.0
            if k < n_dc:
                f = torch.ones(p, p) / p
                colour = torch.randn(c, generator=gen)
            else:
                th = float(torch.rand(1, generator=gen)) * 2 * math.pi
                off = (float(torch.rand(1, generator=gen)) - 0.5) * 0.75 * p
                f = torch.tanh((math.cos(th) * xx + math.sin(th) * yy - off) * 1.5)
                f = f - f.mean()
                f = f / f.norm() * 0.5
            w[k] = f[None, None] * colour[:, None, None, None] / t


def train_shapes(
    model, processor, tok, steps, batch_img, batch_txt, lr, log, rest_weight=0.25, aux_weight=1.0, patch_lr_scale=0.1
):
    """AdamW on the LM loss; plus, to speed up learning *which* shape it is, an auxiliary
    classifier (square / circle / triangle) on the main merger's output averaged over the image
    tokens the shape covers (weighted by coverage), i.e. on what the LM reads when it attends to
    the shape. The auxiliary head is training scaffolding only: it is not part of the checkpoint."""
    rng = np.random.default_rng(SEEDS["shapes.train_data"])
    tasks = shapes_text_tasks()
    pad_id = tok.token_to_id("<|endoftext|>")
    target_len = DECODE_STEPS + 4
    aux_head = torch.nn.Linear(model.config.vision_config.out_hidden_size, len(SHAPE_NAMES))
    merger_out = {}
    hook = model.model.visual.merger.register_forward_hook(lambda m, a, o: merger_out.__setitem__("y", o))
    params = [p for p in model.parameters() if p.requires_grad] + list(aux_head.parameters())
    patch = [p for n, p in model.named_parameters() if ".patch_embed." in n]
    others = [p for n, p in model.named_parameters() if ".patch_embed." not in n] + list(aux_head.parameters())
    groups = [{"params": patch, "scale": patch_lr_scale}, {"params": others, "scale": 1.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), weight_decay=0.0, eps=1e-8)
    warm = max(1, steps // 20)

    def lr_at(step):
        if step < warm:
            return lr * (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    t0 = time.time()
    ema_acc = None
    field_hits: dict = {}
    aux_hits: list = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["scale"]
        imgs = [render_shape(rng, with_mask=True) for _ in range(batch_img)]
        img_items = [(SHAPES_IMAGE_PROMPT, im, ans) for im, ans, _, _ in imgs]
        coverage = torch.stack([_token_coverage(mask) for _, _, mask, _ in imgs])  # [B, 196]
        shape_labels = torch.tensor([si for _, _, _, si in imgs])
        txt_items = []
        for _ in range(batch_txt):
            p, a = tasks[int(rng.integers(len(tasks)))]
            txt_items.append((p, None, a))
        loss_total = 0.0
        accs = []
        for items in (img_items, txt_items):
            kwargs, labels, wts = _batch(processor, tok, items, target_len, pad_id, rest_weight)
            logits = model(**kwargs, use_cache=False).logits
            ce = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
            )
            loss = (ce * wts.reshape(-1)).sum() / wts.sum()
            if items is img_items and aux_weight:
                feats = merger_out.pop("y").reshape(len(imgs), -1, aux_head.in_features)  # [B, 196, D]
                pooled = (feats * coverage[..., None]).sum(1) / coverage.sum(1, keepdim=True)
                aux_logits = aux_head(pooled)
                aux = torch.nn.functional.cross_entropy(aux_logits, shape_labels)
                loss = loss + aux_weight * aux
                aux_hits.extend((aux_logits.argmax(-1) == shape_labels).tolist())
            loss.backward()
            loss_total += float(loss.detach())
            if items is img_items:
                with torch.no_grad():
                    pred = logits.argmax(-1)
                    for i, (_, _, ans) in enumerate(items):
                        pos = (labels[i] != -100).nonzero()[:, 0][: _answer_len(tok, ans)]
                        ok = pred[i, pos] == labels[i, pos]
                        accs.append(bool(ok.all()))
                        for f, j in FIELD_POS.items():
                            field_hits.setdefault(f, []).append(bool(ok[j]))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc = sum(accs) / len(accs)
        ema_acc = acc if ema_acc is None else 0.9 * ema_acc + 0.1 * acc
        if step % 10 == 0 or step == steps - 1:
            fields = " ".join(f"{f} {sum(v) / len(v):.2f}" for f, v in field_hits.items())
            if aux_hits:
                fields += f" | aux-shape {sum(aux_hits) / len(aux_hits):.2f}"
            field_hits, aux_hits = {}, []
            log(
                f"step {step:4d}/{steps} loss {loss_total:.4f} img-answer-acc(batch) {acc:.2f} ema {ema_acc:.2f} "
                f"[{fields}] lr {lr_at(step):.2e} {time.time() - t0:.0f}s"
            )
    hook.remove()
    model.eval()
    return time.time() - t0


def greedy_answer(model, inputs, eos):
    """Greedy decode of at most 16 tokens (the answers' length), stopping at `eos`."""
    return model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=16,
        eos_token_id=eos,
        pad_token_id=eos[1],
        temperature=None,
        top_k=None,
        top_p=None,
    )


def eval_shapes(model, processor, tok, n, seed, log, batch=20):
    """Exact-answer accuracy with HF greedy generate (eos stops) on n fresh renders + all text tasks."""
    rng = np.random.default_rng(seed)
    ids = token_ids(tok)
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    correct = 0
    wrong = []
    done = 0
    while done < n:
        k = min(batch, n - done)
        imgs = [render_shape(rng) for _ in range(k)]
        parts = [build_inputs(processor, SHAPES_IMAGE_PROMPT, im)[1] for im, _ in imgs]
        kwargs = {
            "input_ids": torch.cat([p["input_ids"] for p in parts]),
            "attention_mask": torch.cat([p["attention_mask"] for p in parts]),
            "mm_token_type_ids": torch.cat([p["mm_token_type_ids"] for p in parts]),
            "pixel_values": torch.cat([p["pixel_values"] for p in parts]),
            "image_grid_thw": torch.cat([p["image_grid_thw"] for p in parts]),
        }
        with torch.no_grad():
            out = greedy_answer(model, kwargs, eos)
        plen = kwargs["input_ids"].shape[1]
        for i, (_, ans) in enumerate(imgs):
            toks = out[i, plen:].tolist()
            cut = [j for j, t in enumerate(toks) if t in eos]
            toks = toks[: cut[0]] if cut else toks
            got = tok.decode(toks, skip_special_tokens=False)
            if got == ans:
                correct += 1
            else:
                wrong.append((ans, got))
        done += k
    text_ok = 0
    tasks = shapes_text_tasks()
    for prompt, ans in tasks:
        _, inp = build_inputs(processor, prompt, None)
        with torch.no_grad():
            out = greedy_answer(model, inp, eos)
        toks = out[0, inp["input_ids"].shape[1] :].tolist()
        cut = [j for j, t in enumerate(toks) if t in eos]
        toks = toks[: cut[0]] if cut else toks
        if tok.decode(toks) == ans:
            text_ok += 1
        else:
            wrong.append((ans, tok.decode(toks)))
    log(f"eval: images {correct}/{n} = {correct / n:.3f}, text {text_ok}/{len(tasks)}")
    for a, g in wrong[:10]:
        log(f"   wrong: want {a!r} got {g!r}")
    return correct, n, text_ok, len(tasks), wrong


def write_accuracy_md(out, correct, n, text_ok, n_text, wrong, args, train_secs):
    acc = correct / n
    cmd = "oracle/.venv/bin/python oracle/build_fixtures.py shapes"
    (out / "ACCURACY.md").write_text(
        f"# shapes: accuracy of the committed checkpoint\n\n"
        f"Measured on the saved bf16 `model.safetensors`, reloaded in fp32 (eager attention), with\n"
        f"HF greedy `generate` (eos = [<|im_end|>, <|endoftext|>] stops it), on {n} fresh renders\n"
        f"(seed {SEEDS['shapes.eval_data']}, never used in training) of the prompt {SHAPES_IMAGE_PROMPT!r}.\n\n"
        f"| what | result |\n|---|---|\n"
        f"| image prompts, exact answer | **{correct}/{n} = {100 * acc:.1f}%** |\n"
        f"| text prompts (all {n_text}), exact answer | {text_ok}/{n_text} |\n\n"
        f"Training: {args.steps} steps x ({args.batch_img} fresh renders + {args.batch_txt} text prompts), AdamW\n"
        f"(betas 0.9/0.98, no weight decay), lr {args.lr} with 5% warm-up and cosine decay to 5%, grad clip 1.\n"
        f"Loss: cross-entropy on the target `answer<|im_end|>\\n<|im_start|>assistant\\n` repeated to\n"
        f"{DECODE_STEPS + 4} tokens (weight 1 on the first `answer<|im_end|>`, 0.25 on the repeats), plus an\n"
        f"auxiliary shape classifier (square/circle/triangle) on the main merger output averaged over\n"
        f"the image tokens the shape covers. The patch embedding starts from oriented edge filters and\n"
        f"trains at 0.1x the learning rate: with the default initialisation the tiny ViT was still\n"
        f"mixing up circles and squares after 450 steps (80% exact). The auxiliary head is not part of\n"
        f"the checkpoint. {train_secs / 60:.1f} min wall clock with 2 torch threads (on a 2-core machine\n"
        f"shared with Rust builds); torch {torch.__version__}.\n\n"
        f"Command (builds, trains, measures this, writes the traces):\n\n    {cmd}\n"
        + ("\nMistakes:\n\n" + "".join(f"- want `{a}`, got `{g}`\n" for a, g in wrong) if wrong else "")
    )


def build_shapes(args, log):
    spec = SPECS["shapes"]
    torch.manual_seed(SEEDS["shapes.init"])
    tok = build_tokenizer(shapes_corpus(), spec["bpe_vocab"])
    out = prepare_folder("shapes", tok, spec)
    log(f"shapes: tokenizer {tok.get_vocab_size()} tokens, vocab_size {padded_vocab(tok)}")
    processor = load_processor(out)
    from transformers import Qwen3VLForConditionalGeneration

    cfg = make_config(spec, tok)
    cfg._attn_implementation = "sdpa"  # training speed; the oracle runs eager
    model = Qwen3VLForConditionalGeneration(cfg)
    edge_init_patch_embed(model, torch.Generator().manual_seed(SEEDS["shapes.init"]))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"shapes: {n_params} parameters, training {args.steps} steps")
    train_secs = train_shapes(model, processor, tok, args.steps, args.batch_img, args.batch_txt, args.lr, log)
    save_model(model, out, spec, token_ids(tok))
    del model
    model = load_fp32(out, "eager")
    correct, n, text_ok, n_text, wrong = eval_shapes(model, processor, tok, args.eval_n, SEEDS["shapes.eval_data"], log)
    # demo images with their answers
    img_dir = out / "images"
    if img_dir.exists():
        shutil.rmtree(img_dir)
    img_dir.mkdir()
    rng = np.random.default_rng(SEEDS["shapes.demo_images"])
    answers = {}
    for i in range(6):
        im, ans = render_shape(rng)
        name = f"demo_{i}.png"
        im.save(img_dir / name, optimize=True)
        answers[name] = ans
    (img_dir / "answers.json").write_text(json.dumps(answers, indent=2, sort_keys=True) + "\n")
    # the trace image: demo_0 (traces/ gets a copy from trace.py)
    (out / "traces").mkdir(exist_ok=True)
    acc = correct / n
    write_accuracy_md(out, correct, n, text_ok, n_text, wrong, args, train_secs)
    if acc < 0.95:
        log(f"WARNING: shapes accuracy {acc:.3f} < 0.95")
    return out


# --------------------------------------------------------------------------------------
# tied / odd: scaled random weights


def test_picture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A deterministic 'natural-ish' picture: smooth gradients, shapes, noise (exercises bicubic)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, ph = rng.uniform(0.02, 0.12), rng.uniform(0.02, 0.12), rng.uniform(0, 6.28)
        img[..., c] = 128 + 90 * np.sin(a * xx + b * yy + ph)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(6):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        x1, y1 = x0 + rng.uniform(8, w / 2), y0 + rng.uniform(8, h / 2)
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.uniform() < 0.5:
            draw.ellipse([x0, y0, x1, y1], fill=col)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=col)
    arr = np.asarray(pil).astype(np.int16) + rng.integers(-12, 13, size=(h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


GENERIC_CORPUS = [
    "Describe this picture.",
    "Tell me a story about a red fox.",
    "What do you see?",
    "Count to five. One, two, three, four, five.",
    "The quick brown fox jumps over the lazy dog.",
    "A picture is worth a thousand words, and a story is worth a thousand pictures.",
    "Once upon a time there was a little fox who lived in a forest near the sea.",
    "The sky was blue, the grass was green and the sun was shining on the water.",
    "She opened the window and looked at the mountains, the river and the old bridge.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 3.14 42.",
    "Colours: red, orange, yellow, green, blue, indigo, violet, black, white, grey.",
    "Animals: fox, cat, dog, horse, bird, fish, mouse, rabbit, bear, wolf, deer.",
    "I think, therefore I am. To be or not to be, that is the question.",
    "user\n",
    "assistant\n",
    "system\n",
    "You are a helpful assistant.",
]


def _init_random(model, gen: torch.Generator, spec: dict, n_real_tokens: int) -> None:
    """Gaussian weights with unit-ish gain everywhere, random norm weights and biases."""

    def normal(t, std, mean=0.0):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=gen) * std + mean)

    def uniform(t, lo, hi):
        with torch.no_grad():
            t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    for name, p in model.named_parameters():
        if (
            name.endswith("norm.weight")
            or name.endswith("norm1.weight")
            or name.endswith("norm2.weight")
            or name.endswith("q_norm.weight")
            or name.endswith("k_norm.weight")
            or name.endswith("layernorm.weight")
        ):
            uniform(p, 0.6, 1.4)
        elif "norm" in name and name.endswith(".bias"):
            normal(p, 0.1)
        elif name.endswith(".bias"):
            normal(p, 0.1)
        elif name.endswith("patch_embed.proj.weight"):
            normal(p, 1.5 / math.sqrt(p[0].numel()))
        elif name.endswith("pos_embed.weight"):
            normal(p, 0.5)
        elif name.endswith("embed_tokens.weight"):
            normal(p, 0.5 if spec["tie"] else 1.0)
        elif name == "lm_head.weight":
            normal(p, 1.0)
        elif p.dim() == 2:
            normal(p, 1.0 / math.sqrt(p.shape[1]))
        else:
            raise RuntimeError(f"unhandled parameter {name} {tuple(p.shape)}")
    # rows past the tokenizer (vocab padding) never win the argmax
    with torch.no_grad():
        emb = model.model.language_model.embed_tokens.weight
        emb[n_real_tokens:] *= 0.01
        if not spec["tie"]:
            model.lm_head.weight[n_real_tokens:] *= 0.01


class _Probe:
    """Forward hooks measuring how much each sublayer moves the residual stream."""

    def __init__(self, model):
        self.model = model
        self.handles = []
        self.rec = {}
        self.zero = set()
        vis = model.model.visual
        lm = model.model.language_model
        self.sublayers = []  # (key, module whose output is the update, block whose input is the residual)
        for j, blk in enumerate(vis.blocks):
            self.sublayers += [(f"vision.{j}.attn", blk.attn, blk), (f"vision.{j}.mlp", blk.mlp, blk)]
        for i, layer in enumerate(lm.layers):
            self.sublayers += [(f"text.{i}.attn", layer.self_attn, layer), (f"text.{i}.mlp", layer.mlp, layer)]
        for key, mod, blk in self.sublayers:
            self.handles.append(blk.register_forward_pre_hook(self._pre(key), with_kwargs=True))
            self.handles.append(mod.register_forward_hook(self._post(key)))
        self.handles.append(vis.merger.register_forward_hook(self._plain("merger")))
        for k, m in enumerate(vis.deepstack_merger_list):
            self.handles.append(m.register_forward_hook(self._plain(f"deepstack.{k}")))

    def _pre(self, key):
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self.rec.setdefault(key, {})["x"] = x.detach().clone()

        return hook

    def _post(self, key):
        def hook(mod, args, out):
            y = out[0] if isinstance(out, tuple) else out
            self.rec.setdefault(key, {})["y"] = y.detach().clone()
            if key in self.zero:
                z = torch.zeros_like(y)
                return (z,) + tuple(out[1:]) if isinstance(out, tuple) else z

        return hook

    def _plain(self, key):
        def hook(mod, args, out):
            self.rec[key] = {"y": out.detach().clone()}
            if key in self.zero:
                return torch.zeros_like(out)

        return hook

    def ratios(self):
        """key -> (||update|| / ||residual||, min over tokens of the same)."""
        res = {}
        for key, _, _ in self.sublayers:
            r = self.rec.get(key)
            if not r or "y" not in r:
                continue
            x = r["x"].reshape(-1, r["x"].shape[-1]).double()
            y = r["y"].reshape(-1, r["y"].shape[-1]).double()
            if key.endswith(".mlp"):
                a = self.rec[key.replace(".mlp", ".attn")]["y"].reshape(x.shape).double()
                x = x + a
            tot = float(y.norm() / x.norm())
            per = float((y.norm(dim=-1) / x.norm(dim=-1)).min())
            res[key] = (tot, per)
        return res

    def remove(self):
        for h in self.handles:
            h.remove()


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits[0].float()


def _out_proj(model, key):
    kind, idx, part = key.split(".")
    idx = int(idx)
    if kind == "vision":
        blk = model.model.visual.blocks[idx]
        return blk.attn.proj if part == "attn" else blk.mlp.linear_fc2
    layer = model.model.language_model.layers[idx]
    return layer.self_attn.o_proj if part == "attn" else layer.mlp.down_proj


def _scale_linear(lin, c):
    with torch.no_grad():
        lin.weight.mul_(c)
        if lin.bias is not None:
            lin.bias.mul_(c)


def _round_bf16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


UPDATE_TARGET = 1.0  # each sublayer's update norm / residual norm after calibration (>= 0.3 required)
DS_TARGET = 0.5  # DeepStack addition norm / stream norm at the image rows
MAX_ATTEMPTS = 1500
FIRM_DECODE = 0.15  # a decode step counts as firm for the seed search (the gates use 0.1)
FIRM_PREFIX = 16  # the free-running decode gate compares the first 16 steps
# Simulated bundle figures a seed must stay under: half the ladder gate's 1 - cos budget, a quarter of the vision gate's
# (verify/gates/default.json: layer 0.999, vision 0.9997), a kept margin far above the arithmetic differences between
# this simulation, the Rust reference and the engine's kernels (summation order: ~1e-5 of a logit), and decode margins
# that keep the reference firm (>= 0.1) over the first 16 steps.
HEADROOM = dict(ladder_max=5e-4, vision_max=7.5e-5, margin_min=0.01, prefix_margin_min=0.11)


def calibrate(model, all_inputs, target=UPDATE_TARGET, ds_target=DS_TARGET, merger_target=1.0, log=print):
    """Rescale, in forward order, each sublayer's output projection so its update is `target` x
    the residual norm on the worse of the prompts; the main merger so image rows are as large as
    the text embeddings; DeepStack k (right after text layer k) so it adds ds_target x the stream
    norm at the image rows. Each unit is measured after all earlier ones were fixed."""
    probe = _Probe(model)
    vis = model.model.visual
    n_ds = len(vis.deepstack_merger_list)
    img_inputs = [i for i in all_inputs if "pixel_values" in i]

    def run(inp):
        probe.rec = {}
        _forward(model, inp)

    def stream_after(i):
        key = f"text.{i}.mlp"
        return probe.rec[key]["x"][0] + probe.rec[f"text.{i}.attn"]["y"][0] + probe.rec[key]["y"][0]

    try:
        units = [k for k, _, _ in probe.sublayers if k.startswith("vision")] + ["merger"]
        for i in range(len(model.model.language_model.layers)):
            units += [f"text.{i}.attn", f"text.{i}.mlp"] + ([f"deepstack.{i}"] if i < n_ds else [])
        for unit in units:
            if unit == "merger":
                emb = model.model.language_model.embed_tokens.weight
                wants, gots = [], []
                for inp in img_inputs:
                    run(inp)
                    ids = inp["input_ids"][0]
                    wants.append(float(emb[ids[ids != model.config.image_token_id]].norm(dim=-1).mean()))
                    gots.append(float(probe.rec["merger"]["y"].norm(dim=-1).mean()))
                _scale_linear(vis.merger.linear_fc2, merger_target * min(wants) / min(gots))
            elif unit.startswith("deepstack"):
                k = int(unit.split(".")[1])
                rs = []
                for inp in img_inputs:
                    run(inp)
                    mask = inp["input_ids"][0] == model.config.image_token_id
                    rs.append(float(probe.rec[unit]["y"].norm() / stream_after(k)[mask].norm()))
                _scale_linear(vis.deepstack_merger_list[k].linear_fc2, ds_target / min(rs))
            else:
                rs = []
                for inp in img_inputs if unit.startswith("vision") else all_inputs:
                    run(inp)
                    rs.append(probe.ratios()[unit][0])
                _scale_linear(_out_proj(model, unit), target / min(rs))
    finally:
        probe.remove()


def measure(model, prompts: dict, steps: int, log=print):
    """Update ratios, logit margins and how many top-1 tokens flip when one sublayer is dropped.

    prompts: label -> inputs. Returns a dict for the README."""
    result = {"ratios": {}, "margins": {}, "flips": {}, "decoded": {}}
    probe = _Probe(model)
    try:
        for label, inp in prompts.items():
            probe.rec = {}
            _forward(model, inp)
            for key, (tot, per) in probe.ratios().items():
                result["ratios"].setdefault(key, {})[label] = (tot, per)
            if "pixel_values" in inp:
                mask = inp["input_ids"][0] == model.config.image_token_id
                for k in range(len(model.model.visual.deepstack_merger_list)):
                    key = f"text.{k}.mlp"
                    x = probe.rec[key]["x"][0] + probe.rec[key.replace("mlp", "attn")]["y"][0] + probe.rec[key]["y"][0]
                    ds = probe.rec[f"deepstack.{k}"]["y"]
                    result["ratios"].setdefault(f"deepstack.{k}", {})[label] = (
                        float(ds.double().norm() / x[mask].double().norm()),
                        float((ds.double().norm(dim=-1) / x[mask].double().norm(dim=-1)).min()),
                    )
        probe.remove()
        for label, inp in prompts.items():
            prompt_logits = _forward(model, inp)
            tokens, dec_logits = greedy_decode(model, inp, steps)
            result["decoded"][label] = tokens.tolist()
            top2 = prompt_logits.topk(2, dim=-1).values
            pm = (top2[:, 0] - top2[:, 1]).tolist()
            top2d = dec_logits.topk(2, dim=-1).values
            dm = (top2d[:, 0] - top2d[:, 1]).tolist()
            result["margins"][label] = {"prompt": pm, "decode": dm}
            # teacher-forced prompt + continuation, to count flips per dropped sublayer
            full = dict(inp)
            full["input_ids"] = torch.cat([inp["input_ids"], tokens[None]], dim=1)
            full["mm_token_type_ids"] = torch.cat(
                [inp["mm_token_type_ids"], torch.zeros(1, steps, dtype=inp["mm_token_type_ids"].dtype)], dim=1
            )
            full["attention_mask"] = torch.ones_like(full["input_ids"])
            T = inp["input_ids"].shape[1]
            base = _forward(model, full)[: T + steps - 1].argmax(-1)
            probe2 = _Probe(model)
            try:
                keys = [k for k, _, _ in probe2.sublayers]
                if "pixel_values" in inp:
                    keys += ["merger"] + [
                        f"deepstack.{k}" for k in range(len(model.model.visual.deepstack_merger_list))
                    ]
                else:
                    keys = [k for k in keys if k.startswith("text")]
                for key in keys:
                    probe2.zero = {key}
                    alt = _forward(model, full)[: T + steps - 1].argmax(-1)
                    result["flips"].setdefault(key, {})[label] = (int((alt != base).sum()), T + steps - 1)
            finally:
                probe2.remove()
    finally:
        probe.remove()
    return result


def build_random(name, args, log):
    spec = SPECS[name]
    torch.manual_seed(SEEDS[f"{name}.init"])
    tok = build_tokenizer(GENERIC_CORPUS * 3, spec["bpe_vocab"])
    out = prepare_folder(name, tok, spec)
    log(f"{name}: tokenizer {tok.get_vocab_size()} tokens, vocab_size {padded_vocab(tok)}")
    processor = load_processor(out)
    traces = out / "traces"
    traces.mkdir(exist_ok=True)
    w, h = spec["image_size"]
    image = test_picture(np.random.default_rng(SEEDS[f"{name}.image"]), w, h)
    image.save(traces / "image.png")
    image = Image.open(traces / "image.png")
    _, img_inp = build_inputs(processor, spec["image_prompt"], image)
    _, txt_inp = build_inputs(processor, spec["text_prompt"], None)
    prompts = {"image": img_inp, "text": txt_inp}
    from transformers import Qwen3VLForConditionalGeneration

    cfg = make_config(spec, tok)
    cfg._attn_implementation = "eager"
    banned = {tok.token_to_id(s) for s in SPECIAL_TOKENS if s not in ("<|im_end|>", "<|endoftext|>")}
    seed = SEEDS[f"{name}.init"]
    # Deterministic seed search: the first init whose greedy decodes (both prompts) pick no
    # vision/special token, use >= 6 distinct tokens (random models like to loop on one token),
    # are firm (top-1 - top-2 >= FIRM_DECODE) on each of the first FIRM_PREFIX steps and on >= 20
    # of the 24, and whose bundles in every mode (simulated by quant_sim) pass the bundle gates
    # with headroom: a fixture whose int8 bundle fails tests its seed, not the converter.
    for attempt in range(MAX_ATTEMPTS):
        gen = torch.Generator().manual_seed(seed + 1000 * attempt)
        torch.manual_seed(seed + 1000 * attempt)
        model = Qwen3VLForConditionalGeneration(cfg)
        model.eval()
        _init_random(model, gen, spec, tok.get_vocab_size())
        calibrate(
            model,
            [img_inp, txt_inp],
            target=spec.get("update_target", UPDATE_TARGET),
            ds_target=spec.get("ds_target", DS_TARGET),
            log=log,
        )
        _round_bf16(model)
        why = []
        decoded = {}
        for label, inp in prompts.items():
            toks, logits = greedy_decode(model, inp, DECODE_STEPS, cross_check=False)
            decoded[label] = toks
            toks = toks.tolist()
            top2 = logits.topk(2, dim=-1).values
            margins = (top2[:, 0] - top2[:, 1]).tolist()
            firm = sum(m >= FIRM_DECODE for m in margins)
            prefix = next((j for j, m in enumerate(margins) if m < FIRM_DECODE), len(margins))
            if any(t in banned or t >= tok.get_vocab_size() for t in toks):
                why.append(f"{label}: decodes a vision/special token")
            if len(set(toks)) < 6:
                why.append(f"{label}: only {len(set(toks))} distinct decode tokens")
            if firm < 20:
                why.append(f"{label}: only {firm} firm decode steps")
            if prefix < FIRM_PREFIX:
                why.append(f"{label}: decode step {prefix} is not firm")
        if not why:
            why = headroom_problems(mode_figures(model, prompts, decoded), **HEADROOM)
        if not why:
            break
        log(f"{name}: init seed {seed + 1000 * attempt} rejected ({'; '.join(why[:3])})")
    else:
        raise RuntimeError(f"{name}: no init seed passed")
    used_seed = seed + 1000 * attempt
    save_model(model, out, spec, token_ids(tok))
    model = load_fp32(out, "eager")
    stats = measure(model, prompts, DECODE_STEPS, log)
    stats["bundles"] = mode_figures(model, prompts, {k: torch.tensor(v) for k, v in stats["decoded"].items()})
    write_random_readme(name, out, spec, tok, used_seed, stats, img_inp, txt_inp, log)
    return out


def _fmt_ratio(v):
    return f"{v[0]:.2f} (min/token {v[1]:.2f})"


def write_random_readme(name, out, spec, tok, seed, stats, img_inp, txt_inp, log):
    lines = []
    worst = min(v[0] for per in stats["ratios"].values() for v in per.values())
    worst_tok = min(v[1] for per in stats["ratios"].values() for v in per.values())
    lines.append("| sublayer | image prompt | text prompt | top-1 flips if dropped (image / text) |")
    lines.append("|---|---|---|---|")
    for key, per in stats["ratios"].items():
        fl = stats["flips"].get(key, {})
        fi = f"{fl['image'][0]}/{fl['image'][1]}" if "image" in fl else "-"
        ft = f"{fl['text'][0]}/{fl['text'][1]}" if "text" in fl else "-"
        lines.append(
            f"| {key} | {_fmt_ratio(per['image']) if 'image' in per else '-'} | "
            f"{_fmt_ratio(per['text']) if 'text' in per else '-'} | {fi} / {ft} |"
        )
    fl = stats["flips"].get("merger", {})
    if fl:
        lines.append(f"| merger (image embeddings) | - | - | {fl['image'][0]}/{fl['image'][1]} / - |")
    ratio_table = "\n".join(lines)
    mlines = [
        "| prompt | T | prompt positions with margin >= 0.1 | min / median prompt margin | "
        "firm decode steps (>= 0.1) | min / median decode margin |",
        "|---|---|---|---|---|---|",
    ]
    for label, m in stats["margins"].items():
        pm, dm = np.array(m["prompt"]), np.array(m["decode"])
        mlines.append(
            f"| {label} | {len(pm)} | {(pm >= 0.1).sum()}/{len(pm)} | {pm.min():.3f} / {np.median(pm):.2f} | "
            f"{(dm >= 0.1).sum()}/{len(dm)} | {dm.min():.3f} / {np.median(dm):.2f} |"
        )
    margin_table = "\n".join(mlines)
    blines = [
        "| mode | prompt | worst layer 1 - cos | worst vision 1 - cos | firm positions kept | "
        "smallest kept margin | smallest margin, first 16 decode steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, per in stats["bundles"].items():
        for label, f in per.items():
            blines.append(
                f"| {mode} | {label} | {f['ladder']:.1e} ({f['worst_stage']}) | "
                f"{f['vision']:.1e} | {f['firm'] - f['flips']}/{f['firm']} | {f['min_sim_margin']:.3f} | "
                f"{f['decode_prefix_margin']:.3f} |"
            )
    bundle_table = "\n".join(blines)
    update_target = spec.get("update_target", UPDATE_TARGET)
    v, t = spec["vision"], spec["text"]
    grid = img_inp["image_grid_thw"][0].tolist()
    w, h = spec["image_size"]
    desc = {
        "tied": "tied embeddings like Qwen3-VL-2B/4B: `tie_word_embeddings: true` in `text_config` and at the top "
        "level, and **no `lm_head.weight`** in `model.safetensors`. Its trace image is "
        f"{w}x{h} (w x h), which `smart_resize` turns into {grid[2] * 16}x{grid[1] * 16}: a real PIL bicubic "
        "resize (down in height, up in width).",
        "odd": "a deliberately different shape: one DeepStack tap, no GQA (kv heads = heads), head_dim 24, "
        "out_hidden 32 != vision hidden 48, untied. Its trace image is non-square and needs no resize "
        f"({w}x{h} -> grid {grid[1]}x{grid[2]} patches). Note: `o_proj` has in = 2 x 24 = 48, not a multiple "
        "of 32, so an int8 conversion must refuse it by name (or keep it f16 when the fallback is asked for).",
    }[name]
    style = (
        "`rope_parameters` (as transformers 5.23 writes it)"
        if spec["config_style"] == "hf5"
        else "`rope_theta` + `rope_scaling` (as the published checkpoints)"
    )
    readme = f"""# fixtures/{name}

An **untrained** tiny Qwen3-VL checkpoint (`Qwen3VLForConditionalGeneration`, bf16), {desc}

Weights are random but scaled so that a wrong layer shows: every attention and MLP sublayer, in
both towers, moves the residual stream by a large fraction of its norm, and the logits have clear
top-1/top-2 margins. The config is spelled with {style}.

## Config

- vision: depth {v["depth"]}, hidden {v["hidden_size"]}, intermediate {v["intermediate_size"]}, heads {v["num_heads"]},
  patch 16, temporal patch 2, merge 2, num_position_embeddings {v["num_position_embeddings"]}
  ({int(math.isqrt(v["num_position_embeddings"]))}^2), deepstack {v["deepstack_visual_indexes"]}, out_hidden {v["out_hidden_size"]}
- text: hidden {t["hidden_size"]}, layers {t["num_hidden_layers"]}, heads {t["num_attention_heads"]}, kv heads {t["num_key_value_heads"]},
  head_dim {t["head_dim"]}, intermediate {t["intermediate_size"]}, rope_theta 5e6, mrope_section {t["rope_parameters"]["mrope_section"]}
  interleaved, rms_norm_eps 1e-6, tie_word_embeddings {str(spec["tie"]).lower()}
- tokenizer: byte-level BPE with Qwen's pre-tokenizer, {tok.get_vocab_size()} tokens (Qwen's 14 special tokens
  last), vocab_size {padded_vocab(tok)} (rounded up to a multiple of 64)
- preprocessor: min_pixels {spec["min_pixels"]}, max_pixels {spec["max_pixels"]}, mean/std 0.5, bicubic (resample 3)

## Traces (`traces/`)

| file | prompt | image | T |
|---|---|---|---|
| `image.safetensors` | {spec["image_prompt"]!r} | `image.png` ({w}x{h}, grid {grid}) | {img_inp["input_ids"].shape[1]} |
| `text.safetensors` | {spec["text_prompt"]!r} | - | {txt_inp["input_ids"].shape[1]} |

D = {DECODE_STEPS} greedy steps, K = {TOP_K}, full logits included.

## Measured (on the saved bf16 weights, fp32 eager)

Update ratio = ||sublayer output|| / ||its residual input|| over all tokens (and the minimum over
tokens). For `deepstack.k` it is ||DeepStack k|| / ||stream at the image rows|| after text layer k.
Worst ratio: **{worst:.2f}** (min over tokens {worst_tok:.2f}); required >= 0.30.
"Flips" counts the prompt + teacher-forced decode positions whose top-1 token changes when that one
sublayer's update is dropped.

{ratio_table}

{margin_table}

Simulated bundles (`oracle/quant_sim.py`: the weights rounded exactly as `q3vl convert` rounds
them, run in torch; prompt + teacher-forced decode positions; margins in favour of the fp32 top-1).
`q3vl verify --bundle` measures the same figures with the Rust reference; the seed was chosen so
that they stay within half the ladder gate's budget and a quarter of the vision gate's. Rows
`M/engine` also round the activations entering every int8 product as an int8 x int8 (W8A8) engine
would (per block of 32, amax / 127; the engine now keeps activations in f32, so this is a pessimistic bound), for the engine ≡ reference gate: they are measured against the weights-only
bundle M (the reference on the bundle), over the decode steps that gate counts; their ladder is
reported, not required:

{bundle_table}

## How it was built

    oracle/.venv/bin/python oracle/build_fixtures.py {name}

Init seed {seed}; image seed {SEEDS[f"{name}.image"]}. Weights: Gaussian (1/sqrt(fan_in)), norm weights
U(0.6, 1.4), biases N(0, 0.1); then each sublayer's output projection (o_proj, down_proj, attn.proj,
mlp.linear_fc2) was rescaled in forward order so its update is {update_target}x the residual norm on the
worse of the two trace prompts; the main merger so image rows are as large as text embeddings; each
DeepStack merger so it adds {DS_TARGET}x the stream norm at the image rows; then everything was rounded
to bf16. Rows of padded vocab ids are scaled by 0.01 so they never win. Seeds are tried in a fixed
order (init seed + 1000 k) until both greedy decodes pick no vision/special token, use >= 6 distinct
tokens, are firm (margin >= {FIRM_DECODE}) on each of the first {FIRM_PREFIX} steps and on >= 20 of 24, and
every simulated bundle (int8hu, int8lin, fp16, and the engine on int8hu and int8lin) keeps every firm top-1 with a margin >= {HEADROOM["margin_min"]}
({HEADROOM["prefix_margin_min"]} in the first {FIRM_PREFIX} decode steps), a worst decoder-layer 1 - cos <= {HEADROOM["ladder_max"]:.0e}
and a worst vision 1 - cos <= {HEADROOM["vision_max"]:.1e}.
"""  # noqa: E501 (the README's own lines, kept as generated)
    (out / "README.md").write_text(readme)
    log(f"{name}: worst update ratio {worst:.2f} (per token {worst_tok:.2f})")
    for label, m in stats["margins"].items():
        dm = np.array(m["decode"])
        log(f"{name}/{label}: firm decode {(dm >= 0.1).sum()}/{len(dm)}")


# --------------------------------------------------------------------------------------
# traces


def trace_commands(name: str) -> list[list[str]]:
    spec = SPECS[name]
    d = f"fixtures/{name}"
    if name == "shapes":
        image = f"{d}/images/demo_0.png"
    else:
        image = f"{d}/traces/image.png"
    common = ["--decode-steps", str(DECODE_STEPS), "--top-k", str(TOP_K), "--full-logits"]
    return [
        [
            "oracle/trace.py",
            "--model",
            d,
            "--prompt",
            spec["image_prompt"],
            "--image",
            image,
            "--out",
            f"{d}/traces/image.safetensors",
        ]
        + common,
        ["oracle/trace.py", "--model", d, "--prompt", spec["text_prompt"], "--out", f"{d}/traces/text.safetensors"]
        + common,
    ] + (shapes_conversation_commands(d, common) if name == "shapes" else [])


def shapes_conversation_commands(d: str, common: list[str]) -> list[list[str]]:
    """Two images of other sizes in one prompt, and two turns with an image in the first
    (the conversation is oracle/conversations/shapes_two_turns.json)."""
    two_images = ["--prompt", "Which picture has more shapes?"]
    for img in ["small_1.png", "wide_3.png"]:
        two_images += ["--image", f"{d}/images/{img}"]
    two_turns = ["--messages", "oracle/conversations/shapes_two_turns.json", "--image", f"{d}/images/small_2.png"]
    return [
        ["oracle/trace.py", "--model", d] + two_images + ["--out", f"{d}/traces/two_images.safetensors"] + common,
        ["oracle/trace.py", "--model", d] + two_turns + ["--out", f"{d}/traces/two_turns.safetensors"] + common,
    ]


def write_other_sizes(d: Path) -> None:
    """Shapes pictures at other sizes for the conversation traces: two squares (224, 256)
    and a wide crop (320x192)."""
    from PIL import Image

    im = d / "images"
    Image.open(im / "demo_1.png").resize((224, 224), Image.BICUBIC).save(im / "small_1.png")
    Image.open(im / "demo_2.png").resize((256, 256), Image.BICUBIC).save(im / "small_2.png")
    wide = Image.open(im / "demo_3.png").crop((0, 96, 448, 352)).resize((320, 192), Image.BICUBIC)
    wide.save(im / "wide_3.png")


def write_traces(name: str, log) -> None:
    import shlex

    if name == "shapes":
        write_other_sizes(FIXTURES_DIR / "shapes")
    for cmd in trace_commands(name):
        log("$ oracle/.venv/bin/python " + " ".join(shlex.quote(c) for c in cmd))
        subprocess.run([sys.executable] + cmd, cwd=REPO_DIR, check=True)


def write_shapes_readme(log):
    out = FIXTURES_DIR / "shapes"
    spec = SPECS["shapes"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    cmds = "\n".join(
        "    oracle/.venv/bin/python " + " ".join((f"'{c}'" if " " in c else c) for c in cmd)
        for cmd in trace_commands("shapes")
    )
    v, t = spec["vision"], spec["text"]
    answers = json.loads((out / "images" / "answers.json").read_text())
    from safetensors import safe_open

    rows = []
    for label in ("image", "text"):
        p = out / "traces" / f"{label}.safetensors"
        if p.exists():
            with safe_open(str(p), "pt") as f:
                T = f.get_slice("input_ids").get_shape()[0]
                tv = f.get_tensor("decode.top_values")
                firm = int(((tv[:, 0] - tv[:, 1]) >= 0.1).sum())
                dec = tok.decode(f.get_tensor("decode.tokens").tolist())
                prompt = f.metadata()["prompt"]
            rows.append(f"| `{label}.safetensors` | {prompt!r} | {T} | {firm}/{DECODE_STEPS} | `{dec!r}` |")
    readme = f"""# fixtures/shapes

A **trained** tiny Qwen3-VL checkpoint (`Qwen3VLForConditionalGeneration`, bf16, untied head) whose
answers depend on the image: 448x448 renders of one shape (square / circle / triangle) in one colour
(red / green / blue / yellow) in one quadrant (top/bottom x left/right) on a random light background,
with random size (120-200 px) and position jitter. Prompt {SHAPES_IMAGE_PROMPT!r} -> e.g.
"a red square at the top left". It also answers two text-only tasks: "Which colour comes after X?"
(red -> green -> blue -> yellow -> red) and "Repeat: <colour> <shape>".

Accuracy and the training recipe: `ACCURACY.md`. Demo renders with their true answers:
`images/` (`answers.json`; the checkpoint answers all six correctly).
Training targets were `answer<|im_end|>\\n<|im_start|>assistant\\n` repeated, so greedy decoding
past `<|im_end|>` (eos not stopping it, as in the traces) keeps repeating the answer firmly.

## Config

- vision: depth {v["depth"]}, hidden {v["hidden_size"]}, intermediate {v["intermediate_size"]}, heads {v["num_heads"]},
  patch 16, temporal patch 2, merge 2, num_position_embeddings {v["num_position_embeddings"]} (16^2),
  deepstack {v["deepstack_visual_indexes"]}, out_hidden {v["out_hidden_size"]}, gelu_pytorch_tanh
- text: hidden {t["hidden_size"]}, layers {t["num_hidden_layers"]}, heads {t["num_attention_heads"]}, kv heads {t["num_key_value_heads"]},
  head_dim {t["head_dim"]}, intermediate {t["intermediate_size"]}, rope_theta 5e6, mrope_section {t["rope_parameters"]["mrope_section"]}
  interleaved, rms_norm_eps 1e-6, tie_word_embeddings false (text_config and top level), no attention bias
- config.json is spelled like the published checkpoints: `text_config.rope_theta` +
  `text_config.rope_scaling` (`mrope_section`, `mrope_interleaved`), vision `model_type: qwen3_vl`
- tokenizer: byte-level BPE with Qwen's pre-tokenizer, {len(tok)} tokens (Qwen's 14 special tokens last),
  vocab_size {json.loads((out / "config.json").read_text())["text_config"]["vocab_size"]}
- preprocessor: the real Qwen3-VL values (min_pixels 65536, max_pixels 16777216, mean/std 0.5,
  bicubic), so 448x448 is not resized: 784 patches, 196 image tokens

## Traces (`traces/`, D = {DECODE_STEPS}, K = {TOP_K}, full logits)

| file | prompt | T | firm decode steps | greedy continuation |
|---|---|---|---|---|
{chr(10).join(rows)}

The image trace uses `images/demo_0.png` (true answer {answers["demo_0.png"]!r}), copied to `traces/demo_0.png`.

## How it was built

    oracle/.venv/bin/python oracle/build_fixtures.py shapes

(tokenizer, config, training, bf16 save, accuracy, demo images, then the traces:)

{cmds}

Seeds: init {SEEDS["shapes.init"]}, training data {SEEDS["shapes.train_data"]}, evaluation
{SEEDS["shapes.eval_data"]}, demo images {SEEDS["shapes.demo_images"]}. Training is on CPU with 2 threads;
rerunning on the same machine reproduces the files, another CPU may differ in the last bits.
"""  # noqa: E501 (the README's own lines, kept as generated)
    (out / "README.md").write_text(readme)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="fixtures to build: shapes, tied, odd (default: all three)")
    ap.add_argument("--traces-only", action="store_true", help="only (re)write the traces of existing fixtures")
    ap.add_argument("--steps", type=int, default=500, help="shapes training steps")
    ap.add_argument("--batch-img", type=int, default=8)
    ap.add_argument("--batch-txt", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-n", type=int, default=240)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    def log(msg):
        print(msg, flush=True)

    names = args.names or ["shapes", "tied", "odd"]
    for name in names:
        if name not in SPECS:
            ap.error(f"unknown fixture {name!r} (shapes, tied, odd)")
    for name in names:
        t0 = time.time()
        if not args.traces_only:
            if name == "shapes":
                build_shapes(args, log)
            else:
                build_random(name, args, log)
        write_traces(name, log)
        if name == "shapes":
            write_shapes_readme(log)
        log(f"{name}: done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
