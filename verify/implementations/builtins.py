"""Built-in implementations behind the candidate seam: the product's fused processors and diffusers' own model.

Each is a `build(standard, component)` callable (verify.implementations.candidate); the processors fuse whatever
component they are given in place, so one callable serves an attention, a block and a whole model.
"""

from __future__ import annotations

from torch import nn

from verify.errors import VerifyError
from verify.implementations import fused_21
from verify.implementations.fused import fuse_attention, fuse_model, processor_class
from verify.models.qwen_image_21 import QwenImage21FlexAttnProcessor


def _processor(name: str):
    def build(standard: nn.Module, component: str) -> nn.Module:
        if fused_21.attentions(standard):  # Qwen-Image 2.1: its own fused processor, the reference
            if name != "reference":
                raise VerifyError(f"the {name!r} processor is Qwen-Image's; Qwen-Image 2.1 has 'reference'")
            return fused_21.fuse_model(standard)
        if component == "attention":
            return fuse_attention(standard, processor=processor_class(name)())
        return fuse_model(standard, processor=name)

    build.__qualname__ = name.replace("-", "_")
    build.layout = "blocked"  # fuse_model's default layout
    build.__doc__ = f"diffusers' component with every joint attention fused, run by the {name!r} processor."
    return build


reference = _processor("reference")
fast = _processor("fast")
fast_compiled = _processor("fast-compiled")


def diffusers(standard: nn.Module, component: str) -> nn.Module:
    """diffusers' standard component as it is: the default reference."""
    return standard


diffusers.fused_modules = ()


def diffusers_flex(standard: nn.Module, component: str) -> nn.Module:
    """Qwen-Image 2.1 with diffusers' QwenImage21FlexAttnProcessor (one flex_attention call with a BlockMask) on
    every attention: judged against the default SDPA prefill, it checks diffusers' two paths against each other."""
    found = fused_21.attentions(standard)
    if not found:
        raise VerifyError("diffusers-flex is Qwen-Image 2.1's flex processor; the model here is not Qwen-Image 2.1")
    for attn in found:
        attn.set_processor(QwenImage21FlexAttnProcessor())
    return standard


diffusers_flex.fused_modules = ()
