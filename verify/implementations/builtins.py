"""Built-in implementations behind the candidate seam: the product's fused processors and diffusers' own model.

Each is a `build(standard, component)` callable (verify.implementations.candidate); the processors fuse whatever
component they are
given in place, so one callable serves an attention, a block and a whole model.
"""

from __future__ import annotations

from torch import nn

from verify.implementations.fused import fuse_attention, fuse_model, processor_class


def _processor(name: str):
    def build(standard: nn.Module, component: str) -> nn.Module:
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
