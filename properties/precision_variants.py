"""Implementations that compute the same function in other arithmetic: correct fp64 reorderings (an explicit softmax
for SDPA's, the interleaved layout), RoPE rotated in the input's dtype, and an attention whose scores, softmax and
product with V run in fp32 whatever the input dtype, as flash-attention kernels do. Shared by the precision tests and
reports/precision/fp64_floor.py, which measures where fp64 verdicts draw the line."""

from __future__ import annotations

import math

import torch
from diffusers.models.attention_processor import Attention

from verify.implementations import fused
from verify.implementations.fused import FusedQwenAttnProcessor, fuse_attention


def explicit_attention(q, k, v, mask, dtype: torch.dtype):
    """softmax(q k^T / sqrt(D) + mask) v over (B, S, H, D), computed in `dtype`, returned in q's dtype."""
    qt, kt, vt = (t.transpose(1, 2).to(dtype) for t in (q, k, v))  # (B, H, S, D)
    scores = qt @ kt.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vt).transpose(1, 2).to(q.dtype)


class ExplicitSoftmax(FusedQwenAttnProcessor):
    """Scores, softmax and the product with V written out in the promoted dtype: a reordering of SDPA's arithmetic."""

    def attend(self, q, k, v, text_mask, hidden_states):
        return explicit_attention(q, k, v, self.joint_mask(text_mask, hidden_states), q.dtype)


class Fp32Attention(FusedQwenAttnProcessor):
    """Scores, softmax and the product with V in fp32 whatever the input dtype (in fp32, bf16 and fp16 runs the same
    arithmetic as the standard's)."""

    def attend(self, q, k, v, text_mask, hidden_states):
        return explicit_attention(q, k, v, self.joint_mask(text_mask, hidden_states), torch.float32)


def real_rope(x: torch.Tensor, freqs: torch.Tensor, use_real: bool = False) -> torch.Tensor:
    """x (B, S, H, D) rotated by complex freqs (S, D/2) in x's dtype: pairs (a, b) -> (a c - b s, a s + b c)."""
    cos, sin = (f.to(x.dtype)[None, :, None, :] for f in (freqs.real, freqs.imag))
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class RopeInInputDtype(FusedQwenAttnProcessor):
    """RoPE rotated in the input's dtype (fp64 in an fp64 run), where diffusers rounds q and k to fp32 to rotate."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        original, fused.apply_rotary_emb_qwen = fused.apply_rotary_emb_qwen, real_rope
        try:
            return super().__call__(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                    attention_mask, image_rotary_emb)
        finally:
            fused.apply_rotary_emb_qwen = original


def build_with(processor: type[FusedQwenAttnProcessor], layout: str = "blocked", precision: str | None = None):
    """A candidate build(standard, component) fusing every joint attention of the component with `processor`."""

    def build(standard, component):
        for attn in [m for m in standard.modules() if isinstance(m, Attention) and m.added_kv_proj_dim is not None]:
            fuse_attention(attn, layout=layout, processor=processor(layout=layout))
        return standard

    build.__qualname__ = f"{processor.__name__}_{layout}"
    build.layout = layout
    if precision:
        build.precision = precision
    return build


class Bf16Attention(FusedQwenAttnProcessor):
    """Scores, softmax and the product with V in bf16 whatever the input dtype."""

    def attend(self, q, k, v, text_mask, hidden_states):
        return explicit_attention(q, k, v, self.joint_mask(text_mask, hidden_states), torch.bfloat16)


# SPECs: properties.precision_variants:NAME
explicit_softmax = build_with(ExplicitSoftmax)
fp32_attention = build_with(Fp32Attention)
fp32_attention_declared = build_with(Fp32Attention, precision="fp32")
bf16_attention = build_with(Bf16Attention)
