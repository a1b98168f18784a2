"""The merged-QKV Qwen-Image attention: fused projection modules, their processor, and in-place model conversion.

`fuse_model` replaces each attention's to_q/to_k/to_v (and add_q_proj/add_k_proj/add_v_proj) by one nn.Linear
and deletes the separate ones, so no code path can silently fall back to them; `unfuse_model` copies the fused
weights back, so anything trained while merged is kept. `verify.checks.probes.count_calls` proves the fused modules ran.
"""

from __future__ import annotations

import importlib

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.nn.utils import skip_init

from verify.errors import VerifyError
from verify.files.model_config import MERGE_KEY
from verify.implementations import adapters
from verify.maths import qkv
from verify.maths.naming import DEFAULT_NAMING, Stream, streams
from verify.models.qwen_image import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)


class FusedQwenAttnProcessor:
    """Joint [text, image] attention of Qwen-Image computed from one fused projection per stream.

    Mirrors diffusers' QwenDoubleStreamAttnProcessor2_0 step for step; each step is a method so that
    verify.planted can break exactly one of them.
    """

    # diffusers' set_attention_backend and enable_parallelism set these on every processor that has them, and
    # dispatch_attention_fn needs both: without them the backend is ignored and context parallelism attends to one
    # shard of the sequence only.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, naming: str = DEFAULT_NAMING, layout: str = "blocked"):
        self.image, self.text = streams(naming)
        self.naming = naming
        self.layout = layout

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # image stream (B, S_img, dim)
        encoder_hidden_states: torch.Tensor,  # text stream (B, S_txt, dim)
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("pass encoder_hidden_states_mask; the processor builds the joint mask")
        head_dim = attn.inner_dim // attn.heads
        img_q, img_k, img_v = self.project(attn, self.image, hidden_states, head_dim)  # (B, S_img, H, D)
        txt_q, txt_k, txt_v = self.project(attn, self.text, encoder_hidden_states, head_dim)  # (B, S_txt, H, D)
        img_q, img_k, txt_q, txt_k = self.normalise(attn, img_q, img_k, txt_q, txt_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q, img_k = (apply_rotary_emb_qwen(t, img_freqs, use_real=False) for t in (img_q, img_k))
            txt_q, txt_k = (apply_rotary_emb_qwen(t, txt_freqs, use_real=False) for t in (txt_q, txt_k))
        joint = self.attend(torch.cat([txt_q, img_q], dim=1), torch.cat([txt_k, img_k], dim=1),
                            torch.cat([txt_v, img_v], dim=1), encoder_hidden_states_mask, hidden_states)
        return self.outputs(attn, joint.to(img_q.dtype), encoder_hidden_states.shape[1])

    def attend(self, q, k, v, text_mask: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor:
        """Joint attention over [text, image] (B, S_txt + S_img, H, D), through diffusers' dispatcher with the
        backend and parallel config diffusers set on this processor."""
        return dispatch_attention_fn(q, k, v, attn_mask=self.joint_mask(text_mask, hidden_states), dropout_p=0.0,
                                     is_causal=False, backend=self._attention_backend,
                                     parallel_config=self._parallel_config)

    def project(self, attn: Attention, stream: Stream, x: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, ...]:
        """One fused matmul, then the (q, k, v) views, each unflattened to heads."""
        fused = getattr(attn, stream.fused)(x)  # (B, S, 3 * H * D)
        shape = qkv.QKVShape.equal(fused.shape[-1], head_dim)
        return tuple(t.unflatten(-1, (-1, head_dim)) for t in qkv.split(fused, shape, self.layout, dim=-1))

    def normalise(self, attn: Attention, img_q, img_k, txt_q, txt_k) -> tuple[torch.Tensor, ...]:
        """QK RMSNorm over head_dim, each stream with its own weights."""
        return attn.norm_q(img_q), attn.norm_k(img_k), attn.norm_added_q(txt_q), attn.norm_added_k(txt_k)

    def joint_mask(self, text_mask: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Boolean (B, 1, 1, S_txt + S_img) mask: the text padding mask, then every image token."""
        if text_mask is None:
            return None
        image = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
        return torch.cat([text_mask.bool(), image], dim=1)[:, None, None, :]

    def outputs(self, attn: Attention, joint: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image, text) outputs from the joint attention result (B, S_txt + S_img, H, D): heads merged, the streams
        split, each through its own output projection."""
        txt_out, img_out = self.split_streams(joint.flatten(2, 3), text_len)
        img_out = attn.to_out[0](img_out.contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)  # dropout
        return img_out, attn.to_add_out(txt_out.contiguous())

    def split_streams(self, joint: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, image) parts of the joint sequence."""
        return joint[:, :text_len], joint[:, text_len:]


def joint_attentions(model: nn.Module) -> list[Attention]:
    """Every Qwen-Image joint attention in `model` (a full model, a block, or one attention)."""
    return [m for m in model.modules() if isinstance(m, Attention) and m.added_kv_proj_dim is not None]


@torch.no_grad()
def fuse_attention(
    attn: Attention, naming: str = DEFAULT_NAMING, layout: str = "blocked", processor=None
) -> Attention:
    """Replace the separate q/k/v projections of both streams by fused ones, and install the fused processor.

    PEFT LoRA adapters on the separate projections become exact adapters on the fused one
    (verify.implementations.adapters); what
    cannot be carried exactly is a VerifyError before anything changes. The new modules skip their random
    initialisation (overwritten anyway): fusing leaves the caller's RNG untouched.
    """
    built = {stream.fused: _fused_projection(attn, stream, layout) for stream in streams(naming)}
    for stream in streams(naming):
        for name in stream.separate:
            delattr(attn, name)
        setattr(attn, stream.fused, built[stream.fused])
    attn.set_processor(processor or FusedQwenAttnProcessor(naming, layout))
    return attn


def _fused_projection(attn: Attention, stream: Stream, layout: str) -> nn.Module:
    """One stream's fused projection (behind a PEFT LoRA layer when the separate ones had adapters)."""
    head_dim = attn.inner_dim // attn.heads
    layers = [getattr(attn, name) for name in stream.separate]
    q, k, v = (adapters.base_layer(layer) for layer in layers)
    rows = [q.out_features, k.out_features, v.out_features]
    found = [adapters.adapters_of(layer, name) for layer, name in zip(layers, stream.separate)]
    fused_adapters = adapters.fuse_adapters(found, rows, layout, head_dim, f"{stream.name} stream")
    fused = skip_init(nn.Linear, q.in_features, sum(rows), bias=q.bias is not None, device=q.weight.device,
                      dtype=q.weight.dtype)
    fused.weight.copy_(qkv.merge(q.weight, k.weight, v.weight, layout, head_dim))
    if q.bias is not None:
        fused.bias.copy_(qkv.merge(q.bias, k.bias, v.bias, layout, head_dim))
    return adapters.wrap(fused, fused_adapters, adapters.active_adapters(layers), adapters.uses_rslora(layers))


@torch.no_grad()
def unfuse_attention(attn: Attention) -> Attention:
    """Copy the fused weights back into separate q/k/v projections (LoRA adapters too: A copied, B split) and restore
    diffusers' processor."""
    proc = attn.processor
    built = {stream.name: _separate_projections(attn, stream, proc.layout) for stream in (proc.image, proc.text)}
    for stream in (proc.image, proc.text):
        for name, layer in zip(stream.separate, built[stream.name]):
            setattr(attn, name, layer)
        delattr(attn, stream.fused)
    attn.set_processor(QwenDoubleStreamAttnProcessor2_0())
    return attn


def _separate_projections(attn: Attention, stream: Stream, layout: str) -> list[nn.Module]:
    head_dim = attn.inner_dim // attn.heads
    layer = getattr(attn, stream.fused)
    fused = adapters.base_layer(layer)
    shape = qkv.QKVShape.equal(fused.out_features, head_dim)
    weights = qkv.split(fused.weight, shape, layout)
    biases = qkv.split(fused.bias, shape, layout) if fused.bias is not None else (None,) * 3
    parts = adapters.split_adapters(adapters.adapters_of(layer, stream.fused), shape, layout)
    out = []
    for w, b, part in zip(weights, biases, parts):
        linear = skip_init(nn.Linear, fused.in_features, w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        linear.weight.copy_(w)
        if b is not None:
            linear.bias.copy_(b)
        out.append(adapters.wrap(linear, part, adapters.active_adapters([layer]), adapters.uses_rslora([layer])))
    return out


# Fused processors by name: "reference" mirrors diffusers step by step; "fast" (verify.implementations.fast_fused)
# makes fewer passes; "fast-compiled" runs the fast processor's norm + RoPE + layout as one torch.compile'd region in
# an eager model.
PROCESSORS = {
    "reference": "verify.implementations.fused:FusedQwenAttnProcessor",
    "fast": "verify.implementations.fast_fused:FastFusedQwenAttnProcessor",
    "fast-compiled": "verify.implementations.fast_fused:RegionCompiledFusedQwenAttnProcessor",
}


def processor_class(name: str) -> type[FusedQwenAttnProcessor]:
    """The fused processor class registered as `name` (imported on demand: verify.implementations.fast_fused imports
    this module)."""
    if name not in PROCESSORS:
        raise VerifyError(f"unknown fused processor {name!r}; expected one of {', '.join(PROCESSORS)}")
    module, _, cls = PROCESSORS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def default_processor(device: str | torch.device) -> str:
    """The processor fuse_model installs when none is named: fast-compiled on cuda (the benchmarked one), the
    step-by-step reference elsewhere."""
    return "fast-compiled" if torch.device(device).type == "cuda" else "reference"


def fuse_model(model: nn.Module, naming: str = DEFAULT_NAMING, layout: str = "blocked",
               processor: str | None = None) -> nn.Module:
    """Convert every joint attention of `model` to fused projections, in place; returns `model`. `processor`
    names one of PROCESSORS (default: `default_processor` of the model's device). LoRA adapters are carried over
    exactly; one that cannot be is a VerifyError before any attention changes."""
    param = next(model.parameters(), None)
    cls = processor_class(processor or default_processor(param.device if param is not None else "cpu"))
    attentions = joint_attentions(model)
    for attn in attentions:
        for stream in streams(naming):
            layers = [getattr(attn, name) for name in stream.separate]
            found = [adapters.adapters_of(layer, name) for layer, name in zip(layers, stream.separate)]
            adapters.fuse_adapters(found, [adapters.base_layer(x).out_features for x in layers], layout,
                                   attn.inner_dim // attn.heads, f"{stream.name} stream")
    for attn in attentions:
        fuse_attention(attn, naming, layout, cls(naming, layout))
    adapters.retarget(model, naming, fused=True)
    if hasattr(model, "register_to_config") and attentions:  # save_pretrained's config.json then says so
        model.register_to_config(**{MERGE_KEY: {"naming": naming, "layout": layout}})
    if getattr(model, "_tp_plan", None):
        model._tp_plan = tensor_parallel_plan(type(model)._tp_plan, naming, layout)
    return model


def tensor_parallel_plan(plan: dict, naming: str, layout: str) -> dict:
    """diffusers' `_tp_plan` for the merged model: each stream's fused projection sharded so that every rank holds
    the q, k and v rows of the same heads. Blocked ([q | k | v]): three equal packed blocks, each split across the
    ranks. Interleaved (per head [q | k | v]): plain colwise, whose contiguous slices are whole per-head groups."""
    from diffusers.hooks.tensor_parallel import PackedColwiseParallel

    style = PackedColwiseParallel([1, 1, 1]) if layout == "blocked" else "colwise"
    out = dict(plan)
    for stream in streams(naming):
        separate = [f"transformer_blocks.*.attn.{name}" for name in stream.separate]
        if any(key in out for key in separate):
            for key in separate:
                out.pop(key, None)
            out[f"transformer_blocks.*.attn.{stream.fused}"] = style
    return out


def unfuse_model(model: nn.Module) -> nn.Module:
    """Inverse of fuse_model, in place (LoRA adapters on the fused projections split back); returns `model`."""
    attentions = joint_attentions(model)
    for attn in attentions:
        for stream in (attn.processor.image, attn.processor.text):
            adapters.adapters_of(getattr(attn, stream.fused), stream.fused)
    naming = attentions[0].processor.naming if attentions else DEFAULT_NAMING
    for attn in attentions:
        unfuse_attention(attn)
    adapters.retarget(model, naming, fused=False)
    if hasattr(model, "register_to_config") and attentions:
        model.register_to_config(**{MERGE_KEY: None})
    if "_tp_plan" in vars(model):
        del model._tp_plan  # the class's plan, for the separate projections, again
    return model
