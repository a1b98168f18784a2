"""Hypothesis strategies for models and their inputs: tiny Qwen-Image configs (heads, head dims, RoPE axes, flags),
input sizes (batch, image grid, text length, padding, edit) and seeds; the same for Qwen-Image 2.1. They ship with
the package because the candidate property suite (`qkv-verify test`, verify/suite) draws from them; properties/ uses
them too.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st

from verify.models import qwen_image, qwen_image_21
from verify.models.qwen_image import InputSpec
from verify.models.qwen_image_21 import InputSpec as InputSpec21


def _positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def expensive(divisor: int = 4) -> int:
    """Example budget of a model-level property: the profile's max_examples / divisor (25 under `ci`)."""
    return max(3, settings.default.max_examples // divisor)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=2**31 - 1)


@st.composite
def rope_axes(draw, *, max_head_dim: int = 16) -> tuple[int, int, int]:
    """Three even, positive RoPE axes; their sum is the head_dim (non powers of two such as 6, 10, 14 included)."""
    if max_head_dim < 6:
        raise ValueError(f"max_head_dim must be at least 6 (three even axes), got {max_head_dim}")
    pairs = draw(st.integers(3, max_head_dim // 2))  # head_dim / 2
    a = draw(st.integers(1, pairs - 2))
    b = draw(st.integers(1, pairs - a - 1))
    return (2 * a, 2 * b, 2 * (pairs - a - b))


@st.composite
def model_configs(
    draw, *, max_heads: int = 5, min_heads: int = 1, max_head_dim: int = 16, max_layers: int = 2,
    zero_cond_t: bool | None = None, layered: bool | None = False,
) -> dict:
    """A tiny Qwen-Image config: 1-5 heads (odd, non powers of two), even head_dim from three even RoPE axes.

    `zero_cond_t` (Edit-2511) and `layered` (Layered: layer-3D RoPE and additional timestep conditioning) are drawn
    when None; never both (diffusers doubles the timesteps for zero_cond_t but not the additional conditioning).
    """
    _positive(max_heads=max_heads, min_heads=min_heads, max_layers=max_layers)
    if min_heads > max_heads:
        raise ValueError(f"min_heads {min_heads} > max_heads {max_heads}")
    if zero_cond_t and layered:
        raise ValueError("zero_cond_t and layered do not combine in diffusers")
    axes = draw(rope_axes(max_head_dim=max_head_dim))
    zero_cond_t = draw(st.booleans()) if zero_cond_t is None else zero_cond_t
    layered = (not zero_cond_t and draw(st.booleans())) if layered is None else layered
    return qwen_image.model_config(
        "tiny",
        num_attention_heads=draw(st.integers(min_heads, max_heads)),
        attention_head_dim=sum(axes),
        axes_dims_rope=axes,
        num_layers=draw(st.integers(1, max_layers)),
        in_channels=draw(st.integers(1, 12)),
        out_channels=draw(st.integers(1, 4)),
        joint_attention_dim=draw(st.integers(1, 12)),
        zero_cond_t=zero_cond_t,
        use_layer3d_rope=layered,
        use_additional_t_cond=layered,
    )


@st.composite
def input_specs(
    draw, *, max_batch: int = 3, max_side: int = 4, max_text: int = 9, edit: bool | None = None,
    padded: bool = False,
) -> InputSpec:
    """Batch, image grid (odd and 1-wide sides), text length, padding per sample, timesteps, edit flag.

    `padded` guarantees an observable padding mask: at least two text tokens, at least one of them padded, and at
    least two image tokens.
    """
    _positive(max_batch=max_batch, max_side=max_side, max_text=max_text)
    batch = draw(st.integers(1, max_batch))
    min_text = 2 if padded else 1
    if max_text < min_text:
        raise ValueError(f"max_text must be at least {min_text}, got {max_text}")
    text_len = draw(st.integers(min_text, max_text))
    pad = draw(st.lists(st.integers(0, text_len - 1), min_size=batch, max_size=batch))
    if padded and not any(pad):
        pad[draw(st.integers(0, batch - 1))] = draw(st.integers(1, text_len - 1))
    height = draw(st.integers(1, max_side))
    min_width = 2 if padded and height == 1 else 1
    width = draw(st.integers(min_width, max(max_side, min_width)))
    timesteps = draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=batch, max_size=batch))
    return InputSpec(
        batch=batch, height=height, width=width, edit=draw(st.booleans()) if edit is None else edit,
        text_len=text_len, pad=tuple(pad), timesteps=tuple(timesteps),
    )


# Qwen-Image 2.1 (verify.models.qwen_image_21): one joint stream, condition images in the text, the block-causal mask.
IMAGE_SIZES_21 = ((2, 2), (1, 4), (4, 1), (2, 4), (4, 2))  # (height, width) in latent tokens: whole 2 x 2 slots


@st.composite
def model_configs_21(draw, *, max_heads: int = 4, max_head_dim: int = 16) -> dict:
    """A tiny Qwen-Image 2.1 config: 1-4 heads, even head_dim from three even RoPE axes, mlp_ratio 1-3,
    causal_condition on or off."""
    _positive(max_heads=max_heads)
    axes = draw(rope_axes(max_head_dim=max_head_dim))
    return qwen_image_21.model_config(
        "tiny", num_attention_heads=draw(st.integers(1, max_heads)), attention_head_dim=sum(axes),
        axes_dims_rope=axes, num_layers=1, mlp_ratio=draw(st.integers(1, 3)),
        in_channels=draw(st.integers(1, 8)), out_channels=draw(st.integers(1, 4)),
        context_in_dim=draw(st.integers(1, 12)), causal_condition=draw(st.booleans()),
    )


@st.composite
def input_specs_21(draw, *, max_batch: int = 3, max_text: int = 9, max_conditions: int = 2) -> InputSpec21:
    """Batch, text length and padding per sample, 0 to `max_conditions` condition images of drawn sizes (two of them
    adjacent or not), the target's size, timesteps."""
    _positive(max_batch=max_batch)
    if max_text < 2:
        raise ValueError(f"max_text must be at least 2 (text on both sides of the images), got {max_text}")
    batch = draw(st.integers(1, max_batch))
    text_len = draw(st.integers(2, max_text))
    conditions = draw(st.lists(st.sampled_from(IMAGE_SIZES_21), max_size=max_conditions))
    return InputSpec21(
        batch=batch, text_len=text_len, conditions=tuple(conditions), adjacent=draw(st.booleans()),
        target=draw(st.sampled_from(IMAGE_SIZES_21)),
        pad=tuple(draw(st.lists(st.integers(0, text_len // 2), min_size=batch, max_size=batch))),
        timesteps=tuple(draw(st.lists(st.floats(0.0, 1.0, width=32), min_size=batch, max_size=batch))),
    )
