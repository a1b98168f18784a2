"""The bench's lean-unfused arm: each merged processor's own arithmetic applied to the *separate* q/k/v projections.

The fast processors differ from diffusers' in two ways at once: one fused projection per stream, and leaner
QK-norm + RoPE + joint-layout arithmetic (verify.implementations.fast_fused). Timing merged against standard mixes the
two; timing merged against this arm, which keeps diffusers' to_q/to_k/to_v and add_q/k/v_proj (three Linear calls per
stream) and then runs the same lean path on their outputs, leaves fusion's own share (the bench's `fusion_speedup`;
reports/gpu/NOTES.md, "Why fusing alone does not pay").

- "reference" -> `UnfusedReferenceQwenAttnProcessor`: FusedQwenAttnProcessor's steps, its projection step made of the
  three separate modules (the same function as diffusers' processor, step for step);
- "fast" -> `LeanUnfusedQwenAttnProcessor`: q/k/v as head views of each projection, then the fast processor's own
  `_joint_qk_kernels` / `_joint_qk_functional` and `_JointCopy` (the same functions, called the same way);
- "fast-compiled" -> `LeanUnfusedRegionQwenAttnProcessor`: the fast-compiled region's arithmetic (`_rms_rope` per
  stream and the joint concatenation) compiled as one torch.compile'd region with the same backend, options and
  dynamic sequence marks, entered with the three projections of each stream instead of one fused one; the same
  fallbacks (under a whole-block torch.compile, in fp64, without RoPE, for other norms) to the lean eager paths.

Each build callable (`lean_unfused(name)`) is a verify.implementations.candidate build with `fused_modules = ()` (an
unfused implementation), so verify.checks.equivalence.run_case proves it computes the standard function.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.normalization import RMSNorm
from torch import nn

from verify.implementations.fast_fused import (
    FastFusedQwenAttnProcessor,
    _rms_rope,
    call_region,
    compile_region,
    mark_varying,
    norm_weights,
)
from verify.implementations.fused import FusedQwenAttnProcessor, joint_attentions
from verify.maths.naming import DEFAULT_NAMING, Stream


class UnfusedReferenceQwenAttnProcessor(FusedQwenAttnProcessor):
    """The reference processor's steps with its projection step made of the three separate projections."""

    def project(self, attn: Attention, stream: Stream, x: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(attn, name)(x).unflatten(-1, (-1, head_dim)) for name in stream.separate)


class LeanUnfusedQwenAttnProcessor(FastFusedQwenAttnProcessor):
    """The fast processor's lean norm + RoPE + joint layout on the outputs of the separate q/k/v projections."""

    def projections(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple:
        """The (image, text) projections: three separate modules per stream, (B, S, H * D) each."""
        return (tuple(getattr(attn, name)(hidden_states) for name in self.image.separate),
                tuple(getattr(attn, name)(encoder_hidden_states) for name in self.text.separate))

    def heads(self, projected, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.unflatten(-1, (-1, head_dim)) for t in projected)  # views, no copies


class LeanUnfusedRegionQwenAttnProcessor(LeanUnfusedQwenAttnProcessor):
    """The fast-compiled region's arithmetic as one compiled region over the separate projections (see the module
    docstring); `region_calls` counts the calls that ran it."""

    def __init__(self, naming: str = DEFAULT_NAMING, layout: str = "blocked", functional: bool | None = None,
                 backend: str = "inductor"):
        super().__init__(naming, layout, functional)
        self.backend = backend
        self.region_calls = 0

    def joint_qkv(self, attn: Attention, txt: tuple, img: tuple, image_rotary_emb) -> tuple:
        norms = (attn.norm_added_q, attn.norm_added_k, attn.norm_q, attn.norm_k)
        dtype = img[0].dtype
        plain = all(isinstance(n, RMSNorm) and n.weight is not None and n.bias is None and n.weight.dtype == dtype
                    for n in norms)
        if (torch.compiler.is_compiling() or self.functional is not None or image_rotary_emb is None or not plain
                or dtype == torch.float64):
            return super().joint_qkv(attn, txt, img, image_rotary_emb)
        self.region_calls += 1
        img_freqs, txt_freqs = image_rotary_emb
        txt_cs, img_cs = torch.view_as_real(txt_freqs), torch.view_as_real(img_freqs)
        mark_varying((*txt, *img), (txt_cs, img_cs))
        return call_region(_compiled_region(self.backend), *txt, *img, *norm_weights(norms), txt_cs, img_cs,
                           tuple(float(n.eps) for n in norms), attn.inner_dim // attn.heads)


def _joint_qkv_region(txt_q, txt_k, txt_v, img_q, img_k, img_v, txt_wq, txt_wk, img_wq, img_wk, txt_cs, img_cs, eps,
                      head_dim: int):
    """verify.implementations.fast_fused's region from separate projections (B, S, H * D): heads, RMSNorm + RoPE in
    fp32 (the same `_rms_rope`), and the joint [text, image] concatenation."""

    def heads(t):
        return t.unflatten(-1, (-1, head_dim))

    q = torch.cat([_rms_rope(heads(txt_q), txt_wq, eps[0], txt_cs), _rms_rope(heads(img_q), img_wq, eps[2], img_cs)],
                  dim=1)
    k = torch.cat([_rms_rope(heads(txt_k), txt_wk, eps[1], txt_cs), _rms_rope(heads(img_k), img_wk, eps[3], img_cs)],
                  dim=1)
    return q, k, torch.cat([heads(txt_v), heads(img_v)], dim=1)


_REGIONS: dict[str, object] = {}


def _compiled_region(backend: str):
    """_joint_qkv_region compiled as verify.implementations.fast_fused compiles its own (compile_region), once per
    process and backend (the caller marks what varies: mark_varying)."""
    if backend not in _REGIONS:
        _REGIONS[backend] = compile_region(_joint_qkv_region, backend)
    return _REGIONS[backend]


# merged processor name (verify.implementations.fused.PROCESSORS) -> its lean-unfused counterpart
PROCESSORS = {
    "reference": UnfusedReferenceQwenAttnProcessor,
    "fast": LeanUnfusedQwenAttnProcessor,
    "fast-compiled": LeanUnfusedRegionQwenAttnProcessor,
}


def processor_for(name: str, **kwargs) -> FusedQwenAttnProcessor:
    """A lean-unfused processor for the merged processor `name` (kwargs: the processor's own, e.g. backend)."""
    if name not in PROCESSORS:
        raise KeyError(f"no lean-unfused counterpart of processor {name!r}; expected one of {', '.join(PROCESSORS)}")
    return PROCESSORS[name](**kwargs)


def install(module: nn.Module, name: str, **kwargs) -> list[FusedQwenAttnProcessor]:
    """Give every joint attention of `module` (an attention, block or model, unfused) the lean-unfused processor of
    `name`, in place; returns the processors installed."""
    installed = []
    for attn in joint_attentions(module):
        for projection in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            if not hasattr(attn, projection):
                raise ValueError(f"lean-unfused: the attention has no {projection} (already fused?)")
        installed.append(processor_for(name, **kwargs))
        attn.set_processor(installed[-1])
    return installed


def lean_unfused(name: str, **kwargs):
    """A verify.implementations.candidate build(standard, component) that installs the lean-unfused processor of
    `name` in place;
    declared unfused (fused_modules = ())."""

    def build(standard: nn.Module, component: str) -> nn.Module:
        install(standard, name, **kwargs)
        return standard

    build.__qualname__ = f"lean_unfused_{name.replace('-', '_')}"
    build.fused_modules = ()
    build.__doc__ = f"diffusers' component, unfused, with the {name!r} processor's arithmetic on q/k/v."
    return build
