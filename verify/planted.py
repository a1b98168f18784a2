"""Planted bugs: deliberately wrong merged implementations that the same comparison must reject.

Each is a candidate `build(standard, component)` (verify.implementations.candidate) and a SPEC of its own, e.g.
`verify.planted:k_v_swapped`: `qkv-verify report --candidate` and `qkv-verify test` must fail every one of them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from verify.implementations import fused_21
from verify.implementations.fused import FusedQwenAttnProcessor, fuse_attention, fuse_model, joint_attentions
from verify.implementations.fused_21 import FusedQwenImage21AttnProcessor
from verify.maths import qkv
from verify.maths.naming import DEFAULT_NAMING


class _KVSwapped(FusedQwenAttnProcessor):
    def project(self, attn, stream, x, head_dim):
        q, k, v = super().project(attn, stream, x, head_dim)
        return q, v, k


class _NormQSwapped(FusedQwenAttnProcessor):
    def normalise(self, attn, img_q, img_k, txt_q, txt_k):
        return attn.norm_added_q(img_q), attn.norm_k(img_k), attn.norm_q(txt_q), attn.norm_added_k(txt_k)


class _SplitOffByOne(FusedQwenAttnProcessor):
    def split_streams(self, joint, text_len):
        return joint[:, :text_len], joint[:, text_len - 1 : -1]  # image part starts one token early


class _MaskIgnored(FusedQwenAttnProcessor):
    def joint_mask(self, text_mask, hidden_states):
        return None


def _with_processor(processor_type: type[FusedQwenAttnProcessor], layout: str = "blocked") -> Callable:
    def build(module: nn.Module, component: str) -> nn.Module:
        for attn in joint_attentions(module):
            fuse_attention(attn, DEFAULT_NAMING, layout, processor=processor_type(DEFAULT_NAMING, layout))
        return module

    build.layout = layout
    return build


def _with_weights(rewrite: Callable[[torch.Tensor, int], torch.Tensor], keep_bias: bool = True) -> Callable:
    """Fuse correctly, then rewrite each fused weight (and bias) as a broken converter would have written it."""

    @torch.no_grad()
    def build(module: nn.Module, component: str) -> nn.Module:
        for attn in joint_attentions(module):
            fuse_attention(attn, DEFAULT_NAMING, "blocked")
            head_dim = attn.inner_dim // attn.heads
            for stream in (attn.processor.image, attn.processor.text):
                linear = getattr(attn, stream.fused)
                linear.weight.copy_(rewrite(linear.weight, head_dim))
                if linear.bias is not None:
                    if keep_bias:
                        linear.bias.copy_(rewrite(linear.bias, head_dim))
                    else:
                        linear.bias.zero_()
        return module

    build.layout = "blocked"
    return build


def _kqv_order(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    q, k, v = qkv.split(t, qkv.QKVShape.equal(t.shape[0], head_dim), "blocked")
    return torch.cat([k, q, v])


def _interleaved_weights(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return qkv.convert_layout(t, qkv.QKVShape.equal(t.shape[0], head_dim), "blocked", "interleaved")


k_v_swapped = _with_processor(_KVSwapped)
kqv_order = _with_weights(_kqv_order)
layout_mixup = _with_weights(_interleaved_weights)
dropped_bias = _with_weights(lambda t, _: t, keep_bias=False)
norm_q_swapped = _with_processor(_NormQSwapped)
split_off_by_one = _with_processor(_SplitOffByOne)
mask_ignored = _with_processor(_MaskIgnored)

# name (its SPEC is verify.planted:<name>) -> (what a real converter or processor got wrong, the broken build)
PLANTED: dict[str, tuple[str, Callable[[nn.Module, str], nn.Module]]] = {
    "k_v_swapped": ("the processor reads k where v is and v where k is", k_v_swapped),
    "kqv_order": ("weights fused as [k; q; v], read as [q; k; v]", kqv_order),
    "layout_mixup": ("weights fused interleaved per head, read as blocked", layout_mixup),
    "dropped_bias": ("the fused projection lost its bias", dropped_bias),
    "norm_q_swapped": ("image q normalised with norm_added_q and text q with norm_q", norm_q_swapped),
    "split_off_by_one": ("the image part of the joint sequence starts a token early", split_off_by_one),
    "mask_ignored": ("the text padding mask is ignored", mask_ignored),
}


# Qwen-Image 2.1: bugs of the cache, the block-causal mask and the fused projection. Several show on one path only
# (the cached decode or the prefill): a check of 2.1 must run both.
class _CacheBeforeRope(FusedQwenImage21AttnProcessor):
    def project(self, attn, x):
        q, k, v = super().project(attn, x)
        self.raw_key = k  # K as projected, before QK-norm and RoPE
        return q, k, v

    def cache(self, layer_cache, mode, write_slice, key, value):
        if layer_cache is not None and mode == "extract" and write_slice is not None:
            layer_cache.store(self.raw_key[:, write_slice].clone(), value[:, write_slice].clone())
            return key, value
        return super().cache(layer_cache, mode, write_slice, key, value)


class _CacheKVSwapped(FusedQwenImage21AttnProcessor):
    def cache(self, layer_cache, mode, write_slice, key, value):
        if layer_cache is not None and mode == "extract" and write_slice is not None:
            layer_cache.store(value[:, write_slice].clone(), key[:, write_slice].clone())
            return key, value
        return super().cache(layer_cache, mode, write_slice, key, value)


class _CacheSliceShort(FusedQwenImage21AttnProcessor):
    """Writes the prefix one token short (its end taken as inclusive); the decode's padding mask is then cut to the
    keys it has, as code sizing the mask from the keys would: the prefill is right, every cached decode is not."""

    def cache(self, layer_cache, mode, write_slice, key, value):
        if mode == "extract" and write_slice is not None:
            write_slice = slice(write_slice.start, write_slice.stop - 1)
        return super().cache(layer_cache, mode, write_slice, key, value)

    def sdpa(self, query, key, value, mask, backend="configured"):
        if mask is not None and mask.shape[-1] > key.shape[1]:
            mask = mask[..., :key.shape[1]]
        return super().sdpa(query, key, value, mask, backend)


class _FullAttention(FusedQwenImage21AttnProcessor):
    def prefill(self, query, key, value, segments, key_valid):
        return self.sdpa(query, key, value, None if key_valid is None else key_valid[:, None, None, :])


class _AdjacentImagesOneBlock(FusedQwenImage21AttnProcessor):
    def prefill(self, query, key, value, segments, key_valid):
        merged = []
        for start, end, is_text in segments:
            if merged and not is_text and not merged[-1][2]:
                merged[-1] = (merged[-1][0], end, False)  # an image block running on into the next one
            else:
                merged.append((start, end, is_text))
        return super().prefill(query, key, value, merged, key_valid)


class _PaddedKeysAttended(FusedQwenImage21AttnProcessor):
    def prefill(self, query, key, value, segments, key_valid):
        return super().prefill(query, key, value, segments, None)


def _with_processor_21(processor_type: type[FusedQwenImage21AttnProcessor]) -> Callable:
    def build(module: nn.Module, component: str) -> nn.Module:
        return fused_21.fuse_model(module, "blocked", processor_type)

    build.layout = "blocked"
    return build


@torch.no_grad()
def fused_bias_21(module: nn.Module, component: str) -> nn.Module:
    """Fused correctly, then given a bias (2.1 has none), as a converter written for Qwen-Image would."""
    fused_21.fuse_model(module)
    g = torch.Generator().manual_seed(7)
    for attn in fused_21.attentions(module):
        linear = attn.to_qkv
        biased = nn.Linear(linear.in_features, linear.out_features, device=linear.weight.device,
                           dtype=linear.weight.dtype)
        biased.weight.copy_(linear.weight)
        biased.bias.copy_(torch.randn(linear.out_features, generator=g, dtype=torch.float64) * 0.1)
        attn.to_qkv = biased
    return module


fused_bias_21.layout = "blocked"
cache_before_rope_21 = _with_processor_21(_CacheBeforeRope)
cache_k_v_swapped_21 = _with_processor_21(_CacheKVSwapped)
cache_slice_short_21 = _with_processor_21(_CacheSliceShort)
full_attention_21 = _with_processor_21(_FullAttention)
adjacent_images_one_block_21 = _with_processor_21(_AdjacentImagesOneBlock)
padded_keys_attended_21 = _with_processor_21(_PaddedKeysAttended)

PLANTED_21: dict[str, tuple[str, Callable[[nn.Module, str], nn.Module]]] = {
    "cache_before_rope_21": ("the cache stores K before QK-norm and RoPE", cache_before_rope_21),
    "cache_k_v_swapped_21": ("the cache stores K where V goes and V where K goes", cache_k_v_swapped_21),
    "cache_slice_short_21": ("the cache write slice one token short", cache_slice_short_21),
    "full_attention_21": ("the block-causal mask replaced by full attention", full_attention_21),
    "adjacent_images_one_block_21": ("two adjacent condition images attended as one block",
                                     adjacent_images_one_block_21),
    "padded_keys_attended_21": ("padded text keys attended in the prefill", padded_keys_attended_21),
    "fused_bias_21": ("a bias added to the fused projection", fused_bias_21),
}


# Sampling (qkv-verify sample): bugs that one forward pass does not show, or shows too small to matter.
class _MaskMemoisedByShape(FusedQwenAttnProcessor):
    """Keeps the first joint mask it builds for a shape, as speed-minded code does: true CFG's negative prompt, of the
    positive's length with other padding, then attends with the positive's padding."""

    def joint_mask(self, text_mask, hidden_states):
        key = None if text_mask is None else (tuple(text_mask.shape), hidden_states.shape[1])
        if key not in vars(self).setdefault("masks", {}):
            self.masks[key] = super().joint_mask(text_mask, hidden_states)
        return self.masks[key]


class _TextKVCachedOnce(FusedQwenAttnProcessor):
    """Keeps each prompt's text keys and values from its first call, as a cross-attention cache would: the prompt is
    the same at every step, but the text stream's keys and values are not (the timestep modulates the stream before
    they are projected). Right at step 1, where each prompt (true CFG's negative one too) computes its own; stale
    from step 2."""

    def attend(self, q, k, v, text_mask, hidden_states):
        text_len = q.shape[1] - hidden_states.shape[1]
        prompt = None if text_mask is None else text_mask.cpu().numpy().tobytes()
        txt_k, txt_v = vars(self).setdefault("kept", {}).setdefault(prompt, (k[:, :text_len], v[:, :text_len]))
        return super().attend(q, torch.cat([txt_k, k[:, text_len:]], dim=1), torch.cat([txt_v, v[:, text_len:]], dim=1),
                              text_mask, hidden_states)


mask_memoised_by_shape = _with_processor(_MaskMemoisedByShape)
text_kv_cached_once = _with_processor(_TextKVCachedOnce)
scale_error_1e3 = _with_weights(lambda t, _: t * (1 + 1e-3))


def zero_cond_modulation_memoised(module: nn.Module, component: str) -> nn.Module:
    """Fused correctly; then, in every block on Qwen-Image-Edit-2511's zero_cond_t path, the image modulation kept
    from its first call, as code that saw the condition image's rows (t = 0) never change would keep them: it keeps
    the target's rows too, which follow the timestep. Right at the first step (both of true CFG's calls share its
    timestep), stale from the second."""
    fuse_model(module, processor="reference")
    for block in module.modules():
        if getattr(block, "zero_cond_t", False) and hasattr(block, "img_mod"):
            kept: dict[tuple, torch.Tensor] = {}
            block.img_mod.register_forward_hook(lambda _m, _a, out, kept=kept: kept.setdefault(tuple(out.shape), out))
    return module


zero_cond_modulation_memoised.layout = "blocked"

PLANTED_SAMPLING: dict[str, tuple[str, Callable[[nn.Module, str], nn.Module]]] = {
    "mask_memoised_by_shape": ("the joint mask memoised by shape: true CFG's negative prompt gets the positive's "
                               "padding", mask_memoised_by_shape),
    "text_kv_cached_once": ("each prompt's text K and V kept from its first call: right at step 1, stale (the "
                            "timestep's modulation changed) from step 2", text_kv_cached_once),
    "scale_error_1e3": ("the fused projection 1e-3 too large (small in one pass, growing over the steps)",
                        scale_error_1e3),
    "zero_cond_modulation_memoised": ("zero_cond_t's image modulation kept from the first call: right at step 1, "
                                      "the target's timestep stale after", zero_cond_modulation_memoised),
}


# Qwen-Image 2.1 sampling: a cache bug that neither one prefill nor one cached decode shows, only a third step.
class _CacheAppended(FusedQwenImage21AttnProcessor):
    """Writes each decode's keys and values back into the prefix cache, as a language model's decode appends its new
    token's: diffusers keeps the prefix as the first step extracted it. The second step decodes right (the cache
    still holds the prefix alone); from the third, the target also attends to the earlier steps' stale target tokens
    (the padding mask extended over them, as such code would)."""

    def cache(self, layer_cache, mode, write_slice, key, value):
        key, value = super().cache(layer_cache, mode, write_slice, key, value)
        if layer_cache is not None and mode == "cached":
            layer_cache.store(key.clone(), value.clone())
        return key, value

    def sdpa(self, query, key, value, mask, backend="configured"):
        if mask is not None and mask.shape[-1] < key.shape[1]:
            mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], key.shape[1] - mask.shape[-1])], dim=-1)
        return super().sdpa(query, key, value, mask, backend)


cache_appended_21 = _with_processor_21(_CacheAppended)

PLANTED_SAMPLING_21: dict[str, tuple[str, Callable[[nn.Module, str], nn.Module]]] = {
    "cache_appended_21": ("each decode's K and V appended to the prefix cache (an LLM's decode cache): right at "
                          "step 2, stale target tokens attended from step 3", cache_appended_21),
}
