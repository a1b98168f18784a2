"""Inputs moved to a check's dtype and device, the same way for every model."""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask


def cast_inputs(inputs: dict, dtype: torch.dtype, device: torch.device | str) -> dict:
    """Floating tensors cast to `dtype` and everything moved to `device`; complex RoPE and masks keep their dtype."""

    def cast(x):
        if isinstance(x, torch.Tensor):
            keep = x.is_complex() or not x.is_floating_point() or x.dtype == torch.bool
            return x.to(device=device) if keep else x.to(device=device, dtype=dtype)
        if isinstance(x, tuple):
            return tuple(cast(t) for t in x)
        if isinstance(x, BlockMask):  # Qwen-Image 2.1's flex mask: rebuilt there (its mask_mod's tensors moved too)
            rebuild = getattr(x, "rebuild_on", None)  # or moved, its indices keeping their dtype
            moved = torch.device(device) != x.kv_num_blocks.device
            return rebuild(device) if rebuild and moved else x.to(device)
        return x

    return {k: cast(v) for k, v in inputs.items()}
