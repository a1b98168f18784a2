"""Properties of state-dict conversion: standard -> merged -> standard is byte-exact and touches nothing else."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from properties.strategies import (
    expensive,
    float_dtypes,
    layouts,
    model_configs,
    namings,
    qkv_shapes,
    random_tensor,
    seeds,
)
from verify.checks.compare import assert_failed, assert_passed, compare_exact
from verify.errors import VerifyError
from verify.implementations.fused import FusedQwenAttnProcessor, fuse_model, joint_attentions, unfuse_model
from verify.maths import qkv
from verify.maths.naming import NAMINGS, streams
from verify.maths.state_dict import merge_state_dict, split_state_dict
from verify.models.qwen_image import build_model

KEY = re.compile(r"^(?P<prefix>.*\.)?(?P<leaf>\w+)\.(?P<param>weight|bias)$")


def _separate_to_fused(naming: str) -> dict[str, str]:
    """Leaf name of each standard projection -> the fused projection it goes into."""
    return {leaf: stream.fused for stream in streams(naming) for leaf in stream.separate}


def _fused_key(key: str, naming: str) -> str | None:
    """The merged key a standard q/k/v key ends up in, or None for every other key."""
    m = KEY.match(key)
    fused = _separate_to_fused(naming).get(m["leaf"]) if m else None
    return f"{m['prefix'] or ''}{fused}.{m['param']}" if fused else None


def _leaf(key: str) -> str | None:
    """The module leaf of a parameter key ('to_qkv' of 'transformer_blocks.0.attn.to_qkv.weight'), else None."""
    m = KEY.match(key)
    return m["leaf"] if m else None


def _standard_state_dict(config: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return build_model(config, seed, dtype).state_dict()


@given(model_configs(layered=None), seeds(), namings(), layouts(), float_dtypes())
def test_state_dict_round_trip_is_byte_exact(config, seed, naming, layout, dtype):
    sd = _standard_state_dict(config, seed, dtype)
    head_dim = config["attention_head_dim"]
    merged = merge_state_dict(sd, naming, layout, head_dim)
    fused_keys = {_fused_key(k, naming) for k in sd} - {None}
    untouched = {k for k in sd if _fused_key(k, naming) is None}
    assert len(fused_keys) == 4 * config["num_layers"]  # (image, text) x (weight, bias) per block
    assert set(merged) == untouched | fused_keys
    assert all(merged[k] is sd[k] for k in untouched), "a non-QKV tensor was replaced"
    back = split_state_dict(merged, naming, layout, head_dim)
    assert_passed(compare_exact(f"state dict {naming}/{layout}", "state_dict", sd, back))


@settings(max_examples=expensive(2))
@given(model_configs(layered=None), seeds(), float_dtypes())
def test_diffusers_naming_blocked_is_what_diffusers_fuse_projections_builds(config, seed, dtype):
    """merge_state_dict(naming="diffusers", layout="blocked") gives, bit for bit, the to_qkv and to_added_qkv weights
    and biases that diffusers' own Attention.fuse_projections() builds on the same model, and no other fused key."""
    model = build_model(config, seed, dtype)
    standard = {k: t.clone() for k, t in model.state_dict().items()}
    merged = merge_state_dict(standard, naming="diffusers", layout="blocked", head_dim=config["attention_head_dim"])
    attentions = joint_attentions(model)
    assert len(attentions) == config["num_layers"]
    for attn in attentions:
        attn.fuse_projections()
    fused_leaves = {stream.fused for stream in streams("diffusers")}
    assert fused_leaves == {"to_qkv", "to_added_qkv"}
    theirs = {k: t for k, t in model.state_dict().items() if _leaf(k) in fused_leaves}
    ours = {k: t for k, t in merged.items() if _leaf(k) in fused_leaves}
    assert len(theirs) == 4 * config["num_layers"], sorted(theirs)  # (to_qkv, to_added_qkv) x (weight, bias)
    assert_passed(compare_exact("merge_state_dict vs diffusers' fuse_projections", "state_dict", theirs, ours))


@given(model_configs(min_heads=2), seeds(), namings(), layouts())
def test_round_trip_with_the_wrong_layout_or_naming_fails(config, seed, naming, layout):
    """The round trip check can fail: the other layout (with > 1 head) or the other naming does not restore."""
    sd = _standard_state_dict(config, seed, torch.float32)
    head_dim = config["attention_head_dim"]
    merged = merge_state_dict(sd, naming, layout, head_dim)
    other_layout = next(x for x in qkv.LAYOUTS if x != layout)
    assert_failed(compare_exact("wrong layout", "state_dict", sd, split_state_dict(merged, naming, other_layout,
                                                                                    head_dim)))
    other_naming = next(n for n in NAMINGS if n != naming)
    assert_failed(compare_exact("wrong naming", "state_dict", sd, split_state_dict(merged, other_naming, layout,
                                                                                    head_dim)))


@given(model_configs(), seeds(), namings(), st.data())
def test_a_projection_without_its_partners_is_refused(config, seed, naming, data):
    sd = _standard_state_dict(config, seed, torch.float32)
    dropped = data.draw(st.sampled_from(sorted(k for k in sd if _fused_key(k, naming))), label="dropped key")
    m = KEY.match(dropped)
    partial = {k: t for k, t in sd.items() if k != dropped}
    with pytest.raises(VerifyError) as info:
        merge_state_dict(partial, naming, "blocked", config["attention_head_dim"])
    assert f"has no {m['leaf']}" in str(info.value) and m["prefix"] in str(info.value)


@given(model_configs(), seeds(), namings())
def test_a_q_without_k_is_refused(config, seed, naming):
    sd = _standard_state_dict(config, seed, torch.float32)
    image = streams(naming)[0]
    partial = {k: t for k, t in sd.items() if f".{image.k}." not in k}
    with pytest.raises(VerifyError, match=f"has no {image.k}"):
        merge_state_dict(partial, naming, "blocked", config["attention_head_dim"])


@given(qkv_shapes(), layouts(), namings(), st.from_regex(r"([a-z_][a-z0-9_]{0,6}\.){0,3}", fullmatch=True),
       st.integers(1, 5), seeds(), float_dtypes())
def test_gqa_state_dict_round_trip(shape, layout, naming, prefix, cols, seed, dtype):
    """Unequal q/k/v sizes under any key prefix: merged, then split with the shape, gives the same bytes."""
    sd = {"other.weight": random_tensor((2, cols), seed=seed, dtype=dtype)}
    for i, (stream, rows) in enumerate(zip(streams(naming)[0].separate, (shape.q_rows, shape.k_rows, shape.v_rows))):
        sd[f"{prefix}{stream}.weight"] = random_tensor((rows, cols), seed=seed + 1 + i, dtype=dtype, specials=True)
        sd[f"{prefix}{stream}.bias"] = random_tensor((rows,), seed=seed + 4 + i, dtype=dtype, specials=True)
    merged = merge_state_dict(sd, naming, layout, shape.head_dim)
    assert set(merged) == {"other.weight", f"{prefix}to_qkv.weight", f"{prefix}to_qkv.bias"}
    back = split_state_dict(merged, naming, layout, shape.head_dim, shape=shape)
    assert_passed(compare_exact("GQA state dict", "state_dict", sd, back))


@given(model_configs(), seeds(), namings(), layouts(), float_dtypes(), st.integers(1, 2))
def test_a_fused_tensor_not_in_three_parts_is_refused(config, seed, naming, layout, dtype, cut):
    sd = merge_state_dict(_standard_state_dict(config, seed, dtype), naming, layout, config["attention_head_dim"])
    key = next(k for k in sd if k.endswith(f"{streams(naming)[1].fused}.weight"))
    sd[key] = sd[key][:-cut]
    with pytest.raises(VerifyError, match="not divisible"):
        split_state_dict(sd, naming, layout, config["attention_head_dim"])


@settings(max_examples=expensive(2))
@given(model_configs(layered=None), seeds(), namings(), layouts(), float_dtypes())
def test_fused_model_state_dict_matches_the_converter(device, config, seed, naming, layout, dtype):
    """fuse_model and merge_state_dict agree; split_state_dict of a fused model, and unfuse_model, restore it."""
    model = torch.nn.Module.to(build_model(config, seed, dtype), device)
    standard = {k: t.clone() for k, t in model.state_dict().items()}
    head_dim = config["attention_head_dim"]
    fuse_model(model, naming, layout)
    assert all(isinstance(a.processor, FusedQwenAttnProcessor) for a in joint_attentions(model))
    fused = model.state_dict()
    assert_passed(compare_exact("fuse_model vs merge_state_dict", "state_dict",
                                merge_state_dict(standard, naming, layout, head_dim), fused, device))
    assert_passed(compare_exact("split_state_dict(fuse_model)", "state_dict", standard,
                                split_state_dict(fused, naming, layout, head_dim), device))
    unfuse_model(model)
    assert not any(isinstance(a.processor, FusedQwenAttnProcessor) for a in joint_attentions(model))
    assert_passed(compare_exact("unfuse_model(fuse_model)", "state_dict", standard, model.state_dict(), device))


@settings(max_examples=expensive(2))
@given(model_configs(layered=None), seeds(), layouts())
def test_fusing_and_unfusing_leave_the_random_stream_untouched(device, config, seed, layout):
    """A seeded pipeline draws the same noise whether or not the model was fused in between (new projection modules
    used to take their random initialisation from the global generator, to be overwritten at once)."""
    model = torch.nn.Module.to(build_model(config, seed), device)
    torch.manual_seed(seed)
    expected = torch.rand(4, device=device)
    torch.manual_seed(seed)
    unfuse_model(fuse_model(model, layout=layout))
    assert torch.equal(torch.rand(4, device=device), expected)


# --- matching_layout and layout_hint (mutation testing: reports/mutation/) --------------------------------------


def _qkv_block(prefix: str, leaves: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}{leaf}.weight": torch.randn(8, 3, generator=g) for leaf in leaves}


@pytest.mark.parametrize("layout", qkv.LAYOUTS)
def test_matching_layout_names_the_layout_merged_weights_were_fused_in(layout):
    """Two heads of 4 rows: blocked and interleaved differ, so exactly one layout splits back bit for bit."""
    from verify.maths.state_dict import matching_layout

    std = {**_qkv_block("b.0.attn.", ("add_q_proj", "add_k_proj", "add_v_proj"), 0), "b.0.other.weight": torch.ones(2)}
    merged = merge_state_dict(std, "diffusers", layout, 4)
    assert set(merged) == {"b.0.attn.to_added_qkv.weight", "b.0.other.weight"}
    assert matching_layout(std, merged, "diffusers", 4) == layout
    wrong = dict(std)
    wrong["b.0.attn.add_k_proj.weight"] = wrong["b.0.attn.add_k_proj.weight"].clone()
    wrong["b.0.attn.add_k_proj.weight"][0, 0] += 1
    assert matching_layout(wrong, merged, "diffusers", 4) is None, "one element off: no layout matches"
    assert matching_layout({**std, "b.0.attn.add_k_proj.weight": std["b.0.attn.add_k_proj.weight"].double()},
                           merged, "diffusers", 4) is None, "the same values in another dtype are other bits"
    assert matching_layout({}, merged, "diffusers", 4) is None


def test_layout_hint_speaks_only_when_the_weights_match_another_layout():
    from verify.maths.state_dict import layout_hint

    assert layout_hint("blocked", None) == "" and layout_hint("interleaved", "interleaved") == ""
    assert layout_hint("blocked", "interleaved") == ("; the merged weights match bit for bit in the interleaved "
                                                     "layout: they were fused interleaved, pass --layout interleaved")
