"""Reading LoRA files: every format lands on the model's modules with its own scale convention; variants are refused.

Also holds the fixture writers (`write_lora`) the CLI tests use: seeded tensors written in each format's key style.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from verify.checks import lora_checkpoint as checkpoint
from verify.checks.lora_audit import audit
from verify.errors import VerifyError
from verify.files import lora_formats as formats
from verify.files import lora_mapping as mapping

FORMATS = ("diffusers", "peft", "diffsynth", "lightning", "kohya", "comfyui")
WITH_ALPHA_KEYS = ("lightning", "kohya", "comfyui")
STANDARD = checkpoint.spec_from_config("tiny")
MERGED = {naming: mapping.retarget(STANDARD, "merged", naming) for naming in ("seed", "diffusers")}
FAST = settings(deadline=None, max_examples=min(50, settings.default.max_examples))


def keys(fmt: str, path: str) -> tuple[str, str, str]:
    """(A key, B key, alpha key) of module `path` in format `fmt`."""
    if fmt == "kohya":
        base = "lora_unet_" + path.replace(".", "_")
        return f"{base}.lora_down.weight", f"{base}.lora_up.weight", f"{base}.alpha"
    base = {"diffusers": "transformer.", "peft": "base_model.model.", "comfyui": "diffusion_model."}.get(fmt, "") + path
    a, b = {"diffsynth": ("lora_A.default", "lora_B.default"), "lightning": ("lora_down", "lora_up"),
            "kohya": ("lora_down", "lora_up")}.get(fmt, ("lora_A", "lora_B"))
    return f"{base}.{a}.weight", f"{base}.{b}.weight", f"{base}.alpha"


def random_modules(spec: mapping.ModelSpec, paths, rank: int, seed: int, dtype=torch.float32) -> dict:
    """path -> (A, B) of the module's real shape, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in paths:
        rows, cols = spec.targets[path]
        out[path] = (torch.randn(rank, cols, generator=g).to(dtype), torch.randn(rows, rank, generator=g).to(dtype))
    return out


def write_lora(path: Path, fmt: str, modules: dict, alpha: float | None = None, **config) -> Path:
    """A LoRA file in format `fmt`; alpha goes where the format keeps it (metadata, adapter_config.json, .alpha)."""
    tensors, rank = {}, next(iter(modules.values()))[0].shape[0]
    for module, (A, B) in modules.items():
        a, b, al = keys(fmt, module)
        tensors[a], tensors[b] = A, B
        if alpha is not None and fmt in WITH_ALPHA_KEYS:
            tensors[al] = torch.tensor(alpha)
    metadata = {"format": "pt"}
    lora_config = {"r": rank, "lora_alpha": alpha, **config}
    if alpha is not None and fmt == "diffusers":
        metadata["lora_adapter_metadata"] = json.dumps(lora_config)
    if alpha is not None and fmt == "peft":
        (path.parent / "adapter_config.json").write_text(json.dumps(lora_config))
    save_file(tensors, path, metadata=metadata)
    return path


def expected_scale(fmt: str, alpha: float | None, rank: int) -> float:
    """The convention each format documents, restated independently of the code under test."""
    return 1.0 if alpha is None or fmt == "diffsynth" else alpha / rank


@st.composite
def files(draw):
    naming = draw(st.sampled_from(("seed", "diffusers")))
    spec = draw(st.sampled_from((STANDARD, MERGED[naming])))
    paths = draw(st.lists(st.sampled_from(sorted(spec.targets)), min_size=1, max_size=6, unique=True))
    return (draw(st.sampled_from(FORMATS)), spec, paths, draw(st.integers(1, 4)),
            draw(st.sampled_from((None, 1.0, 4.0, 8.0))), draw(st.integers(0, 2**16)))


@FAST
@given(files())
def test_every_format_lands_with_its_scale(tmp_path_factory, case):
    fmt, spec, paths, rank, alpha, seed = case
    modules = random_modules(spec, paths, rank, seed)
    lora = formats.read(write_lora(tmp_path_factory.mktemp("f") / "lora.safetensors", fmt, modules, alpha))
    plan = mapping.plan(lora, STANDARD)  # a merged LoRA lands on the standard model too
    record = audit(lora, plan)
    assert lora.format == fmt and plan.unmatched == [] and sorted(plan.matched) == sorted(paths)
    for path, pair in plan.matched.items():
        assert torch.equal(pair.A, modules[path][0]) and torch.equal(pair.B, modules[path][1])
    assert {m["scale"] for m in record["modules"]} == {expected_scale(fmt, alpha, rank)}
    assert record["layout"] == ("merged" if any(mapping.leaf(p) in mapping.FUSED_LEAVES for p in paths) else "standard")
    assert record["tensors"] == sum(len(p.keys) for p in lora.pairs)


@pytest.mark.parametrize(("fmt", "alpha", "source"), [
    ("diffusers", 8.0, "metadata"), ("peft", 8.0, "adapter config"), ("lightning", 8.0, "alpha keys"),
    ("kohya", 1.0, "alpha keys"), ("comfyui", None, "assumed: no alpha found"),
    ("diffsynth", None, "assumed: no alpha found"),
])
def test_alpha_source(tmp_path, fmt, alpha, source):
    modules = random_modules(STANDARD, ["transformer_blocks.0.attn.add_q_proj"], 2, 0)
    assert formats.read(write_lora(tmp_path / "l.safetensors", fmt, modules, alpha)).alpha_source == source


def test_explicit_adapter_config_wins(tmp_path):
    modules = random_modules(STANDARD, ["transformer_blocks.1.attn.to_out.0"], 4, 0)
    path = write_lora(tmp_path / "l.safetensors", "diffusers", modules, 8.0)
    (tmp_path / "mine.json").write_text(json.dumps({"r": 4, "lora_alpha": 2.0, "use_rslora": True}))
    lora = formats.read(path, tmp_path / "mine.json")
    assert lora.alpha_source == "adapter config" and lora.pairs[0].alpha == 2.0 and lora.pairs[0].rslora


def test_kohya_names_resolve_against_real_module_paths(tmp_path):
    paths = ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.1.attn.to_out.0", "img_in",
             "transformer_blocks.1.txt_mlp.net.2", "time_text_embed.timestep_embedder.linear_1"]
    lora = formats.read(write_lora(tmp_path / "k.safetensors", "kohya", random_modules(STANDARD, paths, 1, 0), 1.0))
    assert sorted(mapping.plan(lora, STANDARD).matched) == sorted(paths)


def _raw(tmp_path: Path, tensors: dict, metadata=None) -> Path:
    path = tmp_path / "x.safetensors"
    save_file(tensors, path, metadata=metadata)
    return path


A, B = torch.ones(2, 64), torch.ones(64, 2)
Q = "transformer_blocks.0.attn.to_q"


@pytest.mark.parametrize(("tensors", "metadata", "message"), [
    ({f"{Q}.lora_A.weight": A, f"{Q}.lora_B.weight": B, f"{Q}.lora_magnitude_vector": torch.ones(64)}, None, "DoRA"),
    ({f"{Q}.lora_down.weight": A, f"{Q}.lora_up.weight": B, f"{Q}.dora_scale": torch.ones(1, 64)}, None, "DoRA"),
    ({f"{Q}.hada_w1_a": A}, None, "LoHa"),
    ({f"{Q}.lora_A.weight": A, f"{Q}.lora_B.weight": B, f"{Q}.lora_B.bias": torch.ones(64)}, None, "bias"),
    ({f"{Q}.weight": A}, None, "not supported"),
    ({f"{Q}.lora_A.weight": A}, None, "lacks its B"),
    ({f"{Q}.lora_A.weight": A, f"{Q}.lora_B.weight": B, f"transformer.{Q}.lora_A.weight": A.clone()}, None,
     "same tensor"),
    ({f"{Q}.lora_A.weight": A, f"{Q}.lora_B.weight": B},
     {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 2, "use_dora": True})}, "DoRA"),
    ({f"{Q}.lora_A.weight": A, f"{Q}.lora_B.weight": B}, {"lora_adapter_metadata": json.dumps({"r": 3,
                                                                                                "lora_alpha": 2})},
     "rank 3"),
])
def test_unsupported_is_refused(tmp_path, tensors, metadata, message):
    with pytest.raises(VerifyError, match=message):
        formats.read(_raw(tmp_path, tensors, metadata))


@pytest.mark.parametrize(("name", "content", "message"), [
    ("lora.bin", b"\x80\x04", "pickle"),
    ("lora.safetensors", b"not a safetensors file at all", "corrupt safetensors header"),
    ("lora.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "corrupt safetensors header"),
    ("lora.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}", "corrupt header"),
])
def test_bad_files_are_refused(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(VerifyError, match=message):
        formats.read(tmp_path / name)


def test_no_match_is_an_error(tmp_path):
    modules = random_modules(checkpoint.spec_from_config("small"), ["transformer_blocks.3.attn.to_q"], 1, 0)
    lora = formats.read(write_lora(tmp_path / "l.safetensors", "diffsynth", modules))
    with pytest.raises(VerifyError, match="no LoRA module matched"):
        mapping.plan(lora, STANDARD)


def test_wrong_size_is_an_error(tmp_path):
    modules = random_modules(checkpoint.spec_from_config("small"), ["transformer_blocks.0.attn.to_q"], 1, 0)
    lora = formats.read(write_lora(tmp_path / "l.safetensors", "diffsynth", modules))
    with pytest.raises(VerifyError, match="another model size"):
        mapping.plan(lora, STANDARD)


def test_pipeline_packed_metadata(tmp_path):
    modules = random_modules(STANDARD, ["transformer_blocks.0.attn.to_k"], 2, 0)
    path = tmp_path / "p.safetensors"
    save_file({keys("diffusers", p)[i]: t for p, ab in modules.items() for i, t in enumerate(ab)}, path, metadata={
        "lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 6,
                                             "text_encoder.r": 8, "text_encoder.lora_alpha": 1})})
    lora = formats.read(path)
    assert lora.alpha_source == "metadata" and lora.pairs[0].alpha == 6


def test_ambiguous_kohya_name_is_an_error(tmp_path):
    spec = mapping.ModelSpec({"a.b_c": (4, 4), "a_b.c": (4, 4)}, head_dim=4)
    g = torch.Generator().manual_seed(0)
    path = write_lora(tmp_path / "k.safetensors", "kohya", {"a.b_c": (torch.randn(1, 4, generator=g),
                                                                      torch.randn(4, 1, generator=g))}, 1.0)
    with pytest.raises(VerifyError, match="fits several modules"):
        mapping.plan(formats.read(path), spec)


def test_two_spellings_of_one_module_are_refused(tmp_path):
    A, B = random_modules(STANDARD, [Q], 1, 0)[Q]
    path = _raw(tmp_path, {f"{Q}.lora_A.weight": A, f"{Q}.lora_B.weight": B,
                           f"lora_unet_{Q.replace('.', '_')}.lora_down.weight": A.clone(),
                           f"lora_unet_{Q.replace('.', '_')}.lora_up.weight": B.clone()})
    with pytest.raises(VerifyError, match="two modules of the file target"):
        mapping.plan(formats.read(path), STANDARD)


def test_kohya_text_encoder_keys_are_listed_unmatched(tmp_path):
    modules = random_modules(STANDARD, [Q], 1, 0)
    path = write_lora(tmp_path / "k.safetensors", "kohya", modules, 1.0)
    tensors, _ = formats.read_safetensors(path)
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    tensors |= {f"{te}.lora_down.weight": torch.ones(1, 8), f"{te}.lora_up.weight": torch.ones(8, 1)}
    save_file(tensors, path)
    lora = formats.read(path)
    assert lora.format == "kohya" and mapping.plan(lora, STANDARD).unmatched == [te]
