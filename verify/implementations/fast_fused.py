"""A faster merged-QKV attention processor: fewer elementwise passes over q and k than diffusers' processor.

Fusing the projections saves little; the elementwise work around them dominates (reports/gpu/NOTES.md, "Why fusing
alone does not pay"). `FastFusedQwenAttnProcessor` computes diffusers' function with one fused projection per stream
(called as a module, so LoRA wrappers and `verify.checks.probes.count_calls` see it) and q, k, v as views of its
output; QK-norm as one `F.rms_norm`, then its weight; RoPE in real arithmetic, cos/sin cached per model forward,
written straight into the joint [text, image] buffer (no concatenation; backward: the inverse rotation); and, under
torch.compile, one fp32 expression per tensor that inductor fuses into one kernel.
`RegionCompiledFusedQwenAttnProcessor` (`fast-compiled`) compiles that expression alone as a region of an eager model.

Precision: in fp16 and bf16 every path rounds where diffusers rounds (`_norm`, `_rope_into`, and `_rms_rope` under
inductor's emulate_precision_casts), since each rounding added or skipped put rare half-precision weight gradients
beyond the relative-to-base rule (`ROUNDING_DRAWS`, `REGION_DRAWS` in properties/implementations/test_fast_fused.py;
reports/gpu/NOTES.md, changes 12, 15 and 17). Under a whole-model torch.compile the expression runs with the caller's
inductor options, which by default elide intermediate casts. In fp64 it runs diffusers' own norm and RoPE, because
the fp64 oracle is diffusers in fp64 (`_diffusers_norm_rope`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.normalization import RMSNorm

from verify.implementations.fused import FusedQwenAttnProcessor
from verify.maths.naming import DEFAULT_NAMING
from verify.models.qwen_image import apply_rotary_emb_qwen


class FastFusedQwenAttnProcessor(FusedQwenAttnProcessor):
    """Joint [text, image] attention from one fused projection per stream, with lean QK-norm, RoPE and layout.

    `functional`: None picks the fused-kernel-friendly expression under torch.compile and the few-pass eager kernels
    otherwise; True or False forces one of them (tests run both in eager).
    """

    def __init__(self, naming: str = DEFAULT_NAMING, layout: str = "blocked", functional: bool | None = None):
        super().__init__(naming, layout)
        self.functional = functional

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
        img, txt = self.projections(attn, hidden_states, encoder_hidden_states)
        q, k, v = self.joint_qkv(attn, txt, img, image_rotary_emb)  # (B, S_txt + S_img, H, D) each
        joint = self.attend(q, k, v, encoder_hidden_states_mask, hidden_states)  # (B, S_txt + S_img, H, D)
        return self.outputs(attn, joint.to(q.dtype), encoder_hidden_states.shape[1])

    def projections(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> tuple:
        """The (image, text) projections: one fused module per stream, (B, S, 3 * H * D) each."""
        return getattr(attn, self.image.fused)(hidden_states), getattr(attn, self.text.fused)(encoder_hidden_states)

    def heads(self, projected, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v (B, S, H, D) as views of one stream's projection."""
        return split_heads(projected, head_dim, self.layout)

    def joint_qkv(self, attn: Attention, txt, img, image_rotary_emb) -> tuple:
        """Normalised, rotated q and k and plain v of the joint [text, image] sequence from the projections."""
        head_dim = attn.inner_dim // attn.heads
        img_q, img_k, img_v = self.heads(img, head_dim)  # (B, S_img, H, D) views
        txt_q, txt_k, txt_v = self.heads(txt, head_dim)
        img_freqs, txt_freqs = image_rotary_emb if image_rotary_emb is not None else (None, None)
        functional = torch.compiler.is_compiling() if self.functional is None else self.functional
        joint_qk = _joint_qk_functional if functional else _joint_qk_kernels
        q = joint_qk(attn.norm_added_q, txt_q, txt_freqs, attn.norm_q, img_q, img_freqs)
        k = joint_qk(attn.norm_added_k, txt_k, txt_freqs, attn.norm_k, img_k, img_freqs)
        v = torch.cat([txt_v, img_v], dim=1) if functional else _JointCopy.apply(txt_v, img_v)
        return q, k, v


class RegionCompiledFusedQwenAttnProcessor(FastFusedQwenAttnProcessor):
    """The fast processor whose QK-norm + RoPE + joint layout runs as one torch.compile'd region even when the model
    runs eagerly: inductor emits one kernel per q/k that reads the fused projection once and writes the joint tensor
    (fp32 arithmetic, rounded where diffusers rounds), and its backward. Compiled on first use (a few seconds, once per
    shape set).

    Falls back to the fast processor's own paths under a whole-model torch.compile, in fp64 (diffusers' own norm and
    RoPE, see `_diffusers_norm_rope`), without RoPE, and for norms other than a weighted RMSNorm of the input's dtype.
    `region_calls` counts the calls that ran the compiled region (tests prove it ran).
    """

    def __init__(self, naming: str = DEFAULT_NAMING, layout: str = "blocked", functional: bool | None = None,
                 backend: str = "inductor"):
        super().__init__(naming, layout, functional)
        self.backend = backend
        self.region_calls = 0

    def joint_qkv(self, attn: Attention, txt: torch.Tensor, img: torch.Tensor, image_rotary_emb) -> tuple:
        norms = (attn.norm_added_q, attn.norm_added_k, attn.norm_q, attn.norm_k)
        plain = all(isinstance(n, RMSNorm) and n.weight is not None and n.bias is None and n.weight.dtype == img.dtype
                    for n in norms)
        if (torch.compiler.is_compiling() or self.functional is not None or image_rotary_emb is None or not plain
                or img.dtype == torch.float64):
            return super().joint_qkv(attn, txt, img, image_rotary_emb)
        self.region_calls += 1
        img_freqs, txt_freqs = image_rotary_emb
        txt_cs, img_cs = torch.view_as_real(txt_freqs), torch.view_as_real(img_freqs)
        mark_varying((txt, img), (txt_cs, img_cs))
        return call_region(_compiled_region(self.backend), txt, img, *norm_weights(norms), txt_cs, img_cs,
                           tuple(float(n.eps) for n in norms), attn.inner_dim // attn.heads, self.layout)


def split_heads(fused: torch.Tensor, head_dim: int, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) as (B, S, H, D) views of one fused projection output (B, S, 3 * H * D): no copies.

    unbind's backward is one stack, so the fused projection gets its gradient in one pass.
    """
    if layout == "blocked":  # [q heads | k heads | v heads]
        return fused.unflatten(-1, (3, -1, head_dim)).unbind(-3)
    return fused.unflatten(-1, (-1, 3, head_dim)).unbind(-2)  # interleaved: per head [q | k | v]


def _joint_qkv_region(txt, img, txt_wq, txt_wk, img_wq, img_wk, txt_cs, img_cs, eps, head_dim: int, layout: str):
    """The compiled region: q/k/v views, RMSNorm + RoPE in fp32, and the joint [text, image] concatenation.

    txt_cs, img_cs: (S, D/2, 2) real views of the complex frequencies (cos, sin); eps: the four norms' eps.
    """
    txt_q, txt_k, txt_v = split_heads(txt, head_dim, layout)
    img_q, img_k, img_v = split_heads(img, head_dim, layout)
    q = torch.cat([_rms_rope(txt_q, txt_wq, eps[0], txt_cs), _rms_rope(img_q, img_wq, eps[2], img_cs)], dim=1)
    k = torch.cat([_rms_rope(txt_k, txt_wk, eps[1], txt_cs), _rms_rope(img_k, img_wk, eps[3], img_cs)], dim=1)
    return q, k, torch.cat([txt_v, img_v], dim=1)


_REGIONS: dict[str, object] = {}


def _compiled_region(backend: str):
    """_joint_qkv_region compiled with `backend`, once per process (the caller marks what varies: `mark_varying`);
    inductor tunes each kernel's launch configuration once."""
    if backend not in _REGIONS:
        _REGIONS[backend] = compile_region(_joint_qkv_region, backend)
    return _REGIONS[backend]


def compile_region(fn, backend: str):
    """`fn` compiled as a region: one graph (fullgraph); under inductor, coordinate-descent tuning and
    emulate_precision_casts (the half-precision roundings written in `_rms_rope` hold)."""
    options = {"coordinate_descent_tuning": True, "emulate_precision_casts": True} if backend == "inductor" else None
    return torch.compile(fn, backend=backend, fullgraph=True, options=options)


# Graphs a compiled region may keep. Each dtype, layout, grad mode, width, and batch or sequence length of 1 (which
# dynamo specialises) is a graph of its own; dynamo's default budget is 8 per function, and with fullgraph=True the 9th
# is a hard failure (FailOnRecompileLimitHit), which the packaged property suite reached on its fp32 attention property
# (reports/gpu/NOTES.md, change 16). The region keeps dynamo's ceiling for all functions together (its
# accumulated_recompile_limit) instead.
REGION_RECOMPILE_LIMIT = 256


def mark_varying(projections: tuple[torch.Tensor, ...], tables: tuple[torch.Tensor, ...]) -> None:
    """Mark the sequence lengths, of the projections and of the RoPE tables, dynamic: the region's first graph serves
    every length (compiled static, its gradient kernel ran slower and a model kept its first resolution's graph:
    reports/gpu/NOTES.md, change 14)."""
    for t in projections:
        torch._dynamo.maybe_mark_dynamic(t, 1)
    for t in tables:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def call_region(region, *args):
    """Call a compiled region; where dynamo refuses a graph past its default budget, again with the region's own
    (REGION_RECOMPILE_LIMIT). Only that call pays for the patch: entered at every call, it cost 30 us of CPU time."""
    try:
        return region(*args)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        limit = max(torch._dynamo.config.recompile_limit, REGION_RECOMPILE_LIMIT)
        with torch._dynamo.config.patch(recompile_limit=limit):
            return region(*args)


def norm_weights(norms) -> list[torch.Tensor]:
    """The QK-norms' weights as the region takes them: views, not Parameters, whose sizes dynamo holds static, so that
    a second head dim (a model's never changes; the packaged suite draws it) makes the region's graph dynamic in it
    instead of compiling a graph per value (18 graphs of the suite's fp32 attention property, against 8)."""
    return [n.weight.view_as(n.weight) for n in norms]


# --- QK-norm + RoPE + joint layout --------------------------------------------------------------------------------


def _norm(norm: torch.nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """QK RMSNorm as one fused op where it is diffusers' RMSNorm with a weight of x's dtype; else the module.

    In fp16 and bf16 the weight is a second op, as in diffusers: the normalised value rounds to x's dtype, then its
    product with the weight; in backward grad * weight rounds before the norm's fp32 backward, and the weight's
    gradient sums rounded products. One fused op with the weight skips those roundings (module docstring: precision);
    the cost is one elementwise pass over q and k, and the weight's backward outside the norm's kernel.
    """
    if norm is None:
        return x
    if isinstance(norm, RMSNorm) and norm.weight is not None and norm.bias is None and norm.weight.dtype == x.dtype:
        if x.dtype in (torch.float16, torch.bfloat16):
            return F.rms_norm(x, (x.shape[-1],), None, norm.eps) * norm.weight
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return norm(x)


def _joint_qk_kernels(txt_norm, txt, txt_freqs, img_norm, img, img_freqs) -> torch.Tensor:
    """Eager: norm each stream, then RoPE both straight into one (B, S_txt + S_img, H, D) buffer."""
    if txt.dtype == torch.float64:
        return _JointCopy.apply(*_diffusers_norm_rope(txt_norm, txt, txt_freqs, img_norm, img, img_freqs))
    txt, img = _norm(txt_norm, txt), _norm(img_norm, img)
    if txt_freqs is None:
        return torch.cat([txt, img], dim=1)
    # fp32 coefficients (fp64 returned above): rounded to a half dtype they bias weight gradients (module docstring)
    coefficients = (*rope_coefficients(txt_freqs, torch.float32), *rope_coefficients(img_freqs, torch.float32))
    return _JointRope.apply(txt, img, *coefficients)


def _joint_qk_functional(txt_norm, txt, txt_freqs, img_norm, img, img_freqs) -> torch.Tensor:
    """torch.compile: norm and RoPE as one fp32 expression per stream and a concatenation, fused by inductor."""
    if txt.dtype == torch.float64:
        return torch.cat(_diffusers_norm_rope(txt_norm, txt, txt_freqs, img_norm, img, img_freqs), dim=1)
    return torch.cat([_norm_rope_expression(txt_norm, txt, txt_freqs),
                      _norm_rope_expression(img_norm, img, img_freqs)], dim=1)


def _diffusers_norm_rope(txt_norm, txt, txt_freqs, img_norm, img, img_freqs) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64: diffusers' own RMSNorm and RoPE (fp32 variance, complex64 RoPE), so that fp64 matches the oracle.

    The fp64 oracle is diffusers in fp64, only fp32-accurate at the norm's variance and at RoPE; computing those in
    true fp64 moves weight gradients by ~1e-6 relative, beyond the fp64 floor. The fast arithmetic is judged in fp32,
    bf16 and fp16, where the standard path's own error sets the bound.
    """
    txt, img = txt_norm(txt) if txt_norm is not None else txt, img_norm(img) if img_norm is not None else img
    if txt_freqs is None:
        return txt, img
    return apply_rotary_emb_qwen(txt, txt_freqs, use_real=False), apply_rotary_emb_qwen(img, img_freqs, use_real=False)


def _norm_rope_expression(norm, x: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
    """RMSNorm then RoPE of x (B, S, H, D) in fp32 (fp64 for fp64), rounded to x's dtype where diffusers rounds."""
    if isinstance(norm, RMSNorm) and norm.weight is not None and norm.bias is None:
        return _rms_rope(x, norm.weight, norm.eps, None if freqs is None else torch.view_as_real(freqs))
    return _rms_rope(_norm(norm, x), None, 0.0, None if freqs is None else torch.view_as_real(freqs))


def _rms_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos_sin: torch.Tensor | None) -> torch.Tensor:
    """x (B, S, H, D) -> RMSNorm (when weight is given) then RoPE (when cos_sin (S, D/2, 2) is given), in fp32.

    A half-precision weight rounds where diffusers' RMSNorm rounds: the normalised value to the weight's dtype, then
    its product with the weight (as the eager kernels do, `_norm`); computed in fp32 throughout instead, the norm
    weight's gradient fell beyond the relative-to-base rule on 2 of 400 draws of the packaged suite (REGION_DRAWS).
    Compiled, those roundings hold only under inductor's emulate_precision_casts (the region sets it).
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    y = x.to(compute)
    if weight is not None:
        y = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + eps)
        if weight.dtype in (torch.float16, torch.bfloat16):
            y = (y.to(weight.dtype) * weight).to(compute)
        else:
            y = y * weight.to(compute)
    if cos_sin is None:
        return y.to(x.dtype)
    cos, sin = pair_coefficients(cos_sin.to(compute))
    # As in the eager kernels: every output element reads x and its pair partner, no stack of the output pairs
    # (inductor's kernel for that form ran 15% slower on an H200; reports/gpu/NOTES.md, change 9).
    return (y * cos + _swap_pairs(y) * sin).to(x.dtype)


def pair_coefficients(cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin_signed), each (S, 1, D), from the frequencies' real view (S, D/2, 2): cos = (c0, c0, c1, c1, ...),
    sin_signed = (-s0, s0, -s1, s1, ...), so that rope(x) = x * cos + swap_pairs(x) * sin_signed."""
    cos, sin = cos_sin[:, None].unbind(-1)  # (S, 1, D/2) each
    return torch.stack([cos, cos], dim=-1).flatten(-2), torch.stack([-sin, sin], dim=-1).flatten(-2)


# (id(freqs), dtype) -> (freqs, its version, coefficients): a model passes the same tensors to every block.
_COEFFICIENTS: dict[tuple, tuple] = {}


def rope_coefficients(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`pair_coefficients` of complex freqs (S, D/2), in `dtype` (fp32 for half-precision x, fp64 for fp64; the
    values are those of the complex64 frequencies). Cached by tensor identity."""
    # The entry holds freqs, so its id cannot be reused while cached; inference-mode tensors cannot enter autograd.
    key = (id(freqs), dtype, torch.is_inference_mode_enabled())
    hit = _COEFFICIENTS.get(key)
    if hit is not None and hit[0] is freqs and hit[1] == freqs._version:
        return hit[2]
    value = tuple(t.to(dtype).contiguous() for t in pair_coefficients(torch.view_as_real(freqs)))
    if len(_COEFFICIENTS) > 8:
        _COEFFICIENTS.clear()
    _COEFFICIENTS[key] = (freqs, freqs._version, value)
    return value


def _swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x1, x0, x3, x2, ...): the partner of each element of an interleaved pair (one copy)."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def _rope_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """out = x * cos + sign * swap_pairs(x) * sin, in three passes (swap, multiply, multiply-add).

    The product x * cos stays in the coefficients' fp32 and the sum rounds once to out's dtype, as diffusers' complex
    fp32 RoPE rounds once (forward and backward). Rounded after each pass (x * cos written to out first), half-precision
    RoPE put weight gradients beyond the rule (module docstring: precision); the fp32 intermediate costs 4 bytes per
    element more than a half-precision one, no extra pass.
    """
    partner = _swap_pairs(x)
    torch.addcmul(torch.mul(x, cos), partner, sin, value=sign, out=out)


class _JointRope(torch.autograd.Function):
    """RoPE of the text and image parts written into one joint (B, S_txt + S_img, H, D) tensor; backward rotates."""

    @staticmethod
    def forward(ctx, txt, img, txt_cos, txt_sin, img_cos, img_sin):
        B, S_txt, H, D = txt.shape
        joint = torch.empty((B, S_txt + img.shape[1], H, D), dtype=txt.dtype, device=txt.device)
        _rope_into(joint[:, :S_txt], txt, txt_cos, txt_sin, 1.0)
        _rope_into(joint[:, S_txt:], img, img_cos, img_sin, 1.0)
        ctx.save_for_backward(txt_cos, txt_sin, img_cos, img_sin)
        ctx.text_len = S_txt
        return joint

    @staticmethod
    def backward(ctx, grad):
        txt_cos, txt_sin, img_cos, img_sin = ctx.saved_tensors
        S_txt = ctx.text_len
        grads = []
        for part, cos, sin in ((grad[:, :S_txt], txt_cos, txt_sin), (grad[:, S_txt:], img_cos, img_sin)):
            out = torch.empty(part.shape, dtype=part.dtype, device=part.device)
            _rope_into(out, part, cos, sin, -1.0)  # the transpose of a rotation is the rotation by -angle
            grads.append(out)
        return grads[0], grads[1], None, None, None, None


class _JointCopy(torch.autograd.Function):
    """The text and image parts copied into one joint (B, S_txt + S_img, ...) tensor (strided sources, one copy each).

    torch.cat of strided views takes a slower generic path; copy_ merges the contiguous head dims. Backward: views.
    """

    @staticmethod
    def forward(ctx, txt, img):
        S_txt = txt.shape[1]
        joint = torch.empty((txt.shape[0], S_txt + img.shape[1], *txt.shape[2:]), dtype=txt.dtype, device=txt.device)
        joint[:, :S_txt].copy_(txt)
        joint[:, S_txt:].copy_(img)
        ctx.text_len = S_txt
        return joint

    @staticmethod
    def backward(ctx, grad):
        return grad[:, : ctx.text_len], grad[:, ctx.text_len :]
