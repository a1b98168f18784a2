"""The merged-QKV Qwen-Image 2.1 attention: one bias-free `to_qkv` per attention, its processor, and in-place
conversion of an attention, a block or a whole model (and back).

The processor mirrors diffusers' QwenImage21AttnProcessor and `_qwenimage21_prepare_qkv` step for step (the exact
multi-pass prefill, the KV-cache bookkeeping, the cached decode); each step is a method so that verify.planted can
break exactly one of them.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn
from torch.nn.utils import skip_init

from verify.errors import VerifyError
from verify.files.model_config import MERGE_KEY
from verify.implementations.fused import tensor_parallel_plan
from verify.maths import qkv
from verify.maths.naming import DEFAULT_NAMING
from verify.models.qwen_image_21 import (
    QwenImage21Attention,
    QwenImage21AttnProcessor,
    QwenImage21KVLayerCache,
    apply_rotary_emb_qwen,
)

FUSED, SEPARATE = "to_qkv", ("to_q", "to_k", "to_v")


class FusedQwenImage21AttnProcessor:
    """Qwen-Image 2.1's block-causal attention computed from one fused projection."""

    # diffusers' set_attention_backend and enable_parallelism set these on every processor that has them
    _attention_backend = None
    _parallel_config = None

    def __init__(self, layout: str = "blocked"):
        self.layout = layout

    def __call__(self, attn: QwenImage21Attention, hidden_states: torch.Tensor, attention_mask=None,
                 rotary_emb: torch.Tensor | None = None, layer_cache: QwenImage21KVLayerCache | None = None,
                 kv_cache_mode: str | None = None, cache_write_slice: slice | None = None,
                 segments: list[tuple[int, int, bool]] | None = None,
                 key_valid: torch.Tensor | None = None) -> torch.Tensor:
        query, key, value = self.project(attn, hidden_states)  # (B, S, H, D)
        query, key = self.normalise(attn, query, key, value.dtype)
        if rotary_emb is not None:
            query, key = (self.rotate(t, rotary_emb) for t in (query, key))
        key, value = self.cache(layer_cache, kv_cache_mode, cache_write_slice, key, value)
        if segments is None:  # decode: full attention over [cached prefix, target]
            hidden = self.sdpa(query, key, value, attention_mask)
        else:
            hidden = self.prefill(query, key, value, segments, key_valid)
        hidden = hidden[:, : query.shape[1]].flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden))

    def project(self, attn: QwenImage21Attention, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One fused matmul, then the (q, k, v) views, each unflattened by head_dim (not heads: tensor parallel)."""
        head_dim = attn.inner_dim // attn.heads
        fused = getattr(attn, FUSED)(x)
        shape = qkv.QKVShape.equal(fused.shape[-1], head_dim)
        return tuple(t.unflatten(-1, (-1, head_dim)) for t in qkv.split(fused, shape, self.layout, dim=-1))

    def normalise(self, attn: QwenImage21Attention, query, key, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """QK RMSNorm over head_dim, back in V's dtype."""
        return attn.norm_q(query).to(dtype), attn.norm_k(key).to(dtype)

    def rotate(self, x: torch.Tensor, rotary_emb: torch.Tensor) -> torch.Tensor:
        """RoPE as diffusers applies it (in fp32 whatever x's dtype)."""
        return apply_rotary_emb_qwen(x, rotary_emb, use_real=False)

    def cache(self, layer_cache, mode, write_slice, key, value) -> tuple[torch.Tensor, torch.Tensor]:
        """`extract`: store the prefix's post-norm, post-RoPE K and V; `cached`: prepend the stored prefix."""
        if layer_cache is not None and mode == "extract" and write_slice is not None:
            layer_cache.store(key[:, write_slice].clone(), value[:, write_slice].clone())
        elif layer_cache is not None and mode == "cached":
            cached_k, cached_v = layer_cache.get()
            key, value = torch.cat([cached_k, key], dim=1), torch.cat([cached_v, value], dim=1)
        return key, value

    def prefill(self, query, key, value, segments, key_valid) -> torch.Tensor:
        """The block-causal prefill: each prefix segment attends to the keys before its end (text segments with a
        causal triangle over their own), the target image to every key; padded text keys never."""
        prefix_len = segments[-1][1] if segments else 0
        outputs = []
        for start, end, is_text in segments:
            mask = self.segment_mask(start, end, is_text, query.device)
            if key_valid is not None:
                valid = key_valid[:, None, None, :end]
                mask = valid if mask is None else mask & valid
            outputs.append(self.sdpa(query[:, start:end], key[:, :end], value[:, :end], mask, backend=None))
        target_mask = None if key_valid is None else key_valid[:, None, None, :]
        outputs.append(self.sdpa(query[:, prefix_len:], key, value, target_mask, backend=None))
        return torch.cat(outputs, dim=1)

    def segment_mask(self, start: int, end: int, is_text: bool, device) -> torch.Tensor | None:
        """A text segment's keys: everything before it, then a causal triangle; an image block: none (all)."""
        if not is_text:
            return None
        length = end - start
        before = torch.ones(length, start, dtype=torch.bool, device=device)
        return torch.cat([before, torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))],
                         dim=1)[None, None]

    def sdpa(self, query, key, value, mask, backend="configured") -> torch.Tensor:
        """One attention call through diffusers' dispatcher: the decode with the configured backend, the prefill's
        calls with the default one, as diffusers' processor makes them."""
        backend = self._attention_backend if backend == "configured" else backend
        return dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, backend=backend,
                                     parallel_config=self._parallel_config)


def attentions(module: nn.Module) -> list[QwenImage21Attention]:
    """Every Qwen-Image 2.1 attention in `module` (a model, a block or one attention)."""
    return [m for m in module.modules() if isinstance(m, QwenImage21Attention)]


@torch.no_grad()
def fuse_attention(attn: QwenImage21Attention, layout: str = "blocked", processor=None) -> QwenImage21Attention:
    """Replace to_q/to_k/to_v by one bias-free to_qkv (rows in `layout`) and install the fused processor."""
    q, k, v = (getattr(attn, name) for name in SEPARATE)
    if any(not isinstance(p, nn.Linear) for p in (q, k, v)):
        raise VerifyError("fusing a Qwen-Image 2.1 attention with LoRA adapters on to_q/to_k/to_v is not supported; "
                          "fuse the base model, then load the fused LoRA")
    fused = skip_init(nn.Linear, q.in_features, 3 * q.out_features, bias=False, device=q.weight.device,
                      dtype=q.weight.dtype)
    fused.weight.copy_(qkv.merge(q.weight, k.weight, v.weight, layout, attn.inner_dim // attn.heads))
    for name in SEPARATE:
        delattr(attn, name)
    setattr(attn, FUSED, fused)
    attn.set_processor(processor or FusedQwenImage21AttnProcessor(layout))
    return attn


def fuse_model(module: nn.Module, layout: str = "blocked", processor_type=FusedQwenImage21AttnProcessor) -> nn.Module:
    """Every attention of `module` fused in place; returns `module`. A model's config then records the merge and its
    `_tp_plan` shards `to_qkv` so that every rank holds the q, k and v rows of the same heads."""
    found = attentions(module)
    for attn in found:
        fuse_attention(attn, layout, processor_type(layout))
    if hasattr(module, "register_to_config") and found:
        module.register_to_config(**{MERGE_KEY: {"naming": DEFAULT_NAMING, "layout": layout}})
    if getattr(module, "_tp_plan", None):
        module._tp_plan = tensor_parallel_plan(type(module)._tp_plan, DEFAULT_NAMING, layout)
    return module


@torch.no_grad()
def unfuse_attention(attn: QwenImage21Attention) -> QwenImage21Attention:
    """The fused weights copied back into separate to_q/to_k/to_v, and diffusers' processor restored."""
    fused, head_dim = getattr(attn, FUSED), attn.inner_dim // attn.heads
    weights = qkv.split(fused.weight, qkv.QKVShape.equal(fused.out_features, head_dim), attn.processor.layout)
    for name, w in zip(SEPARATE, weights):
        linear = skip_init(nn.Linear, fused.in_features, w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        linear.weight.copy_(w)
        setattr(attn, name, linear)
    delattr(attn, FUSED)
    attn.set_processor(QwenImage21AttnProcessor())
    return attn


def unfuse_model(module: nn.Module) -> nn.Module:
    """Inverse of fuse_model, in place; returns `module`."""
    found = attentions(module)
    for attn in found:
        unfuse_attention(attn)
    if hasattr(module, "register_to_config") and found:
        module.register_to_config(**{MERGE_KEY: None})
    if "_tp_plan" in vars(module):
        del module._tp_plan  # the class's plan, for the separate projections, again
    return module
