"""What a converted bundle will see, simulated in torch: a fixture's quantization margins.

The untrained fixtures (tied, odd) are random networks, and random networks amplify small
weight errors. A fixture whose int8 bundle fails the bundle gates tests nothing but its own
seed, so build_fixtures.py picks seeds with this module: it rounds a copy of the model's
weights exactly as `q3vl convert` would (oracle/check_quant.py's numpy quantizer, straight from
docs/quantization.md), runs it, and measures the same figures `q3vl verify --bundle`
gates (verify/gates/default.json), so that a seed is taken only when every mode passes them
with headroom.

Figures per prompt (1 - cos in f64 on flattened tensors; margins are top-1 - top-2 logits):
- vision: merger output and each DeepStack output;
- ladder: every decoder layer's output at the prompt positions;
- firm positions: prompt + teacher-forced decode positions where the fp32 model's margin is
  >= FIRM; each must keep its top-1, and the smallest quantized margin in its favour is kept.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from check_quant import BODY_RE, HEAD, POS_EMBED, quantize_block32

FIRM = 0.1  # verify/gates/default.json: "firm_margin"
PREFIX = 16  # decode steps the free-running gate compares


def _dequant(w: torch.Tensor, kind: str) -> torch.Tensor:
    q, s = quantize_block32(w.detach().float().numpy().astype(np.float32), kind)
    out_f, in_f = q.shape
    deq = q.astype(np.float32).reshape(out_f, in_f // 32, 32) * s.astype(np.float32)[..., None]
    return torch.from_numpy(deq.reshape(out_f, in_f))


def _f16(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(torch.float16).to(torch.float32)


def _q8_acts(x: torch.Tensor) -> torch.Tensor:
    """An int8 x int8 engine's activation rounding before an int8 product (engine/src/kernels/q8.rs
    `quantize_block`; the W8A8 kernel there is tested but the engine runs W8A32, so this bounds
    the engine from above): per block of 32 along the last axis, d = amax / 127 in f32,
    q = clamp(round_half_even(x / d), -127, 127), value q * d."""
    shape = x.shape
    b = x.float().reshape(-1, shape[-1] // 32, 32)
    d = b.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.clamp(torch.round(b / safe), -127, 127)  # torch.round: half to even
    return torch.where(d == 0, torch.zeros_like(b), q * d).reshape(shape).to(x.dtype)


def _round_inputs(module):
    def hook(mod, args):
        return (_q8_acts(args[0]),) + tuple(args[1:])

    module.register_forward_pre_hook(hook)


def quantized_copy(model, mode: str):
    """A deep copy of `model` whose weights are the bundle's dequantized weights for `mode`.

    Tensors with in-features not a multiple of 32 stay f16 (`--fallback-f16`). A mode
    "M/engine" also rounds the activations entering every int8 product, as the engine
    does (its int8 x int8 kernels), so its figures are the engine's, not the reference's."""
    mode, _, engine = mode.partition("/")
    q = copy.deepcopy(model)
    tied = (
        bool(getattr(q.config, "tie_word_embeddings", False))
        or q.lm_head.weight.data_ptr() == q.model.language_model.embed_tokens.weight.data_ptr()
    )
    embed = q.model.language_model.embed_tokens.weight
    with torch.no_grad():
        if tied:
            # The bundle stores its own head; untie so the head can differ from the table.
            q.lm_head.weight = torch.nn.Parameter(embed.detach().clone())
        for name, p in q.named_parameters():
            if p.dim() == 1 or name == POS_EMBED:
                continue  # stored f32, exact from bf16
            if BODY_RE.match(name) and mode in ("int8hu", "int8lin") and p.shape[1] % 32 == 0:
                p.copy_(_dequant(p, "clip"))
                if engine:
                    _round_inputs(q.get_submodule(name.rsplit(".", 1)[0]))
            elif name == HEAD and mode == "int8hu" and p.shape[1] % 32 == 0:
                p.copy_(_dequant(p, "absmax"))
                if engine:
                    _round_inputs(q.lm_head)
            else:
                p.copy_(_f16(p))
    q.eval()
    return q


class _Capture:
    """Forward hooks on each decoder layer, the merger and the DeepStack mergers."""

    def __init__(self, model):
        self.out = {}
        self.handles = []
        lm = model.model.language_model
        vis = model.model.visual
        for i, layer in enumerate(lm.layers):
            self.handles.append(layer.register_forward_hook(self._hook(f"text.layer.{i}")))
        self.handles.append(vis.merger.register_forward_hook(self._hook("vision.merger")))
        for k, m in enumerate(vis.deepstack_merger_list):
            self.handles.append(m.register_forward_hook(self._hook(f"vision.deepstack.{k}")))

    def _hook(self, key):
        def hook(mod, args, out):
            y = out[0] if isinstance(out, tuple) else out
            self.out[key] = y.detach().double().reshape(-1, y.shape[-1]).clone()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _run(model, inputs):
    cap = _Capture(model)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0].double()
    finally:
        cap.close()
    return cap.out, logits


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.reshape(-1)
    b = b.reshape(-1)
    return float(1.0 - (a @ b) / (a.norm() * b.norm()))


def forced_inputs(inputs, tokens: torch.Tensor):
    """The prompt followed by `tokens`, for one teacher-forced pass."""
    full = dict(inputs)
    n = tokens.shape[0]
    full["input_ids"] = torch.cat([inputs["input_ids"], tokens[None]], dim=1)
    full["mm_token_type_ids"] = torch.cat(
        [inputs["mm_token_type_ids"], torch.zeros(1, n, dtype=inputs["mm_token_type_ids"].dtype)], dim=1
    )
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    return full


def figures(ref, sim, inputs, tokens: torch.Tensor, engine: bool = False) -> dict:
    """The gate figures of `sim` against `ref` on one prompt and its fp32 greedy `tokens`.

    One teacher-forced pass each over prompt + tokens[:-1]: positions T-1 .. T+D-2 give the
    decode steps' logits, exactly what the seeded-decode gate compares. With `engine`, `ref`
    is the weights-only bundle (the reference on the bundle) and `sim` the engine; only the
    decode steps before `ref`'s first ambiguous one count, as in the engine ≡ reference gate."""
    T = inputs["input_ids"].shape[1]
    full = forced_inputs(inputs, tokens[:-1])
    ref_h, ref_l = _run(ref, full)
    sim_h, sim_l = _run(sim, full)
    out = {"vision": 0.0, "ladder": 0.0, "flips": 0, "firm": 0, "min_sim_margin": float("inf"), "worst_stage": None}
    for key, a in ref_h.items():
        b = sim_h[key]
        rows = slice(0, T) if key.startswith("text") else slice(None)  # the ladder gates the prompt
        d = _one_minus_cos(a[rows], b[rows])
        kind = "ladder" if key.startswith("text") else "vision"
        if d > out[kind]:
            out[kind] = d
            if kind == "ladder":
                out["worst_stage"] = key
    top2 = ref_l.topk(2, dim=-1)
    margin = top2.values[:, 0] - top2.values[:, 1]
    firm = margin >= FIRM
    want = top2.indices[:, 0]
    got_top = sim_l.argmax(-1)
    # the simulated margin in favour of the reference's top-1 (negative = flipped)
    second = sim_l.clone()
    second[torch.arange(sim_l.shape[0]), want] = -float("inf")
    sim_margin = sim_l[torch.arange(sim_l.shape[0]), want] - second.max(-1).values
    if engine:
        dec = margin[T - 1 :] >= FIRM
        count = int(dec.long().cumprod(0).sum())  # steps before the first ambiguous one
        firm = torch.zeros_like(firm)
        firm[T - 1 : T - 1 + count] = True
        out["count"] = count
    out["firm"] = int(firm.sum())
    # the free-running and engine gates count decode steps until the first ambiguous one
    out["decode_prefix_margin"] = float(sim_margin[T - 1 : T - 1 + PREFIX].min())
    out["flips"] = int((firm & (got_top != want)).sum())
    if firm.any():
        out["min_sim_margin"] = float(sim_margin[firm].min())
    return out


MODES = ("int8hu", "int8lin", "fp16", "int8hu/engine", "int8lin/engine")


def mode_figures(model, prompts: dict, decoded: dict, modes=MODES) -> dict:
    """mode -> label -> figures(), for every prompt label in `prompts` (inputs) / `decoded` (tokens)."""
    res = {}
    for mode in modes:
        base, _, engine = mode.partition("/")
        ref = quantized_copy(model, base) if engine else model
        sim = quantized_copy(model, mode)
        res[mode] = {
            label: figures(ref, sim, inp, decoded[label], engine=bool(engine)) for label, inp in prompts.items()
        }
        del sim, ref
    return res


def headroom_problems(
    res: dict, ladder_max: float, vision_max: float, margin_min: float, prefix_margin_min: float
) -> list[str]:
    """Why these figures are too close to the gates (empty = fine)."""
    why = []
    for mode, per in res.items():
        for label, f in per.items():
            # The engine is gated on tokens against the reference, not on its ladder.
            if f["ladder"] > ladder_max and not mode.endswith("/engine"):
                why.append(f"{mode}/{label}: ladder 1-cos {f['ladder']:.1e} at {f['worst_stage']} > {ladder_max:.0e}")
            if f["vision"] > vision_max and not mode.endswith("/engine"):
                why.append(f"{mode}/{label}: vision 1-cos {f['vision']:.1e} > {vision_max:.0e}")
            if f["flips"]:
                why.append(f"{mode}/{label}: {f['flips']} firm top-1 flips")
            elif f["min_sim_margin"] < margin_min:
                why.append(f"{mode}/{label}: quantized margin {f['min_sim_margin']:.3f} < {margin_min}")
            if "count" in f:
                if f["count"] < PREFIX:
                    why.append(f"{mode}/{label}: the engine gate would count {f['count']} < {PREFIX} steps")
            elif f["decode_prefix_margin"] < prefix_margin_min:
                why.append(
                    f"{mode}/{label}: quantized decode margin {f['decode_prefix_margin']:.3f} "
                    f"< {prefix_margin_min} in the first {PREFIX} steps"
                )
    return why
