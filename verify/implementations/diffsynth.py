"""DiffSynth-Studio's own Qwen-Image DiT as an implementation (`diffsynth`): its attention and block, holding the
standard component's weights (DiffSynth uses diffusers' module names), behind adapters that take diffusers' keyword
arguments. Usable as candidate or reference; its model class is fixed at the real width, so a model is built from
its blocks.

The package's `__init__` imports torchvision (and much else); its DiT module needs only torch and einops, so that
module and the one it imports are loaded from the installed package's folder under a private package name, without
running the package's `__init__` and without touching `sys.modules['diffsynth']`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch import nn

from verify.errors import VerifyError

_PRIVATE = "_qkv_verify_diffsynth_models"


def dit_module():
    """diffsynth.models.qwen_image_dit, loaded without the package's __init__."""
    if f"{_PRIVATE}.qwen_image_dit" in sys.modules:
        return sys.modules[f"{_PRIVATE}.qwen_image_dit"]
    spec = importlib.util.find_spec("diffsynth")
    if spec is None or not spec.submodule_search_locations:
        raise VerifyError("the diffsynth SPEC needs DiffSynth-Studio: pip install --no-deps diffsynth einops")
    package = types.ModuleType(_PRIVATE)
    package.__path__ = [str(Path(spec.submodule_search_locations[0]) / "models")]
    sys.modules[_PRIVATE] = package
    try:
        return importlib.import_module(f"{_PRIVATE}.qwen_image_dit")
    except ModuleNotFoundError as e:
        raise VerifyError(f"the diffsynth SPEC: DiffSynth's DiT needs {e.name!r} (pip install {e.name})") from None


def joint_mask(text_mask: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor | None:
    """The boolean (B, 1, 1, S_txt + S_img) mask DiffSynth takes from its caller; diffusers builds it inside."""
    if text_mask is None:
        return None
    ones = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
    return torch.cat([text_mask.bool(), ones], dim=1)[:, None, None, :]


class Attention(nn.Module):
    """DiffSynth's QwenDoubleStreamAttention called like diffusers' joint Attention: returns (image, text)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask=None, attention_mask=None,
                image_rotary_emb=None):
        return self.inner(image=hidden_states, text=encoder_hidden_states, image_rotary_emb=image_rotary_emb,
                          attention_mask=joint_mask(encoder_hidden_states_mask, hidden_states))


class Block(nn.Module):
    """DiffSynth's QwenImageTransformerBlock called like diffusers' block: returns (text, image)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb=None,
                joint_attention_kwargs=None, modulate_index=None):
        return self.inner(image=hidden_states, text=encoder_hidden_states, temb=temb,
                          image_rotary_emb=image_rotary_emb, modulate_index=modulate_index,
                          attention_mask=joint_mask(encoder_hidden_states_mask, hidden_states))


def diffsynth(standard: nn.Module, component: str) -> nn.Module | None:
    """DiffSynth's attention or block with `standard`'s weights, in its dtype and on its device; no model."""
    if component == "model":
        return None
    dit = dit_module()
    attn = standard if component == "attention" else standard.attn
    heads, head_dim = attn.heads, attn.inner_dim // attn.heads
    with torch.device("meta"):
        if component == "attention":
            inner = dit.QwenDoubleStreamAttention(attn.inner_dim, attn.inner_dim, heads, head_dim)
        else:
            inner = dit.QwenImageTransformerBlock(attn.inner_dim, heads, head_dim)
    weights = {k: v.detach() for k, v in standard.state_dict().items()}
    inner.load_state_dict(weights, strict=True, assign=True)
    for p in inner.parameters():
        p.requires_grad_(True)
    return (Attention if component == "attention" else Block)(inner.eval())


diffsynth.fused_modules = ()  # DiffSynth's own DiT computes q, k and v separately
diffsynth.package = "diffsynth"  # the distribution whose version the summary records

