"""`qkv-verify convert` on a Qwen-Image 2.1 checkpoint: standard <-> merged streamed, proven by --check, and the
merged tensors are those of the merged model built in memory (verify.implementations.fused_21), bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from verify.cli import main
from verify.implementations import fused_21
from verify.models import qwen_image_21 as m

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    """A tiny seeded 2.1 checkpoint as diffusers saves it, and the model it was saved from."""
    model = m.build_model(m.model_config("tiny"), 0, torch.float32)
    path = tmp_path_factory.mktemp("c21") / "std"
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_convert_writes_the_merged_models_tensors_and_back_bit_for_bit(standard, tmp_path, layout, capsys):
    src, model = standard
    assert main(["convert", str(src), str(tmp_path / "m"), "--to", "merged", "--layout", layout]) == 0
    merged = load_file(tmp_path / "m" / WEIGHTS)
    expected = fused_21.fuse_model(m.build_model(m.model_config("tiny"), 0, torch.float32), layout).state_dict()
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["_class_name"] == m.CLASS_NAME
    assert main(["convert", str(src), str(tmp_path / "m"), "--check"]) == 0
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "back"), "--to", "standard", "--layout", layout]) == 0
    back, original = load_file(tmp_path / "back" / WEIGHTS), load_file(src / WEIGHTS)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    assert "proven" in capsys.readouterr().out


def test_check_fails_a_merged_2_1_checkpoint_with_one_value_changed(standard, tmp_path, capsys):
    src, _ = standard
    assert main(["convert", str(src), str(tmp_path / "m"), "--to", "merged"]) == 0
    tensors = load_file(tmp_path / "m" / WEIGHTS)
    key = next(k for k in sorted(tensors) if k.endswith("attn.to_qkv.weight"))
    tensors[key][0, 0] += 1
    save_file(tensors, tmp_path / "m" / WEIGHTS)
    assert main(["convert", str(src), str(tmp_path / "m"), "--check"]) == 1
    assert "not proven" in capsys.readouterr().out


def test_a_model_flag_that_contradicts_the_checkpoint_names_both(standard, tmp_path, capsys):
    src, _ = standard
    assert main(["convert", str(src), str(tmp_path / "m"), "--to", "merged", "--model", "qwen-image"]) == 2
    err = capsys.readouterr().err
    assert "--model qwen-image contradicts" in err and "QwenImage21Transformer2DModel (qwen-image-2.1)" in err
    assert not (tmp_path / "m").exists()


def test_a_config_naming_an_unknown_class_is_one_line(standard, tmp_path, capsys):
    src, _ = standard
    other = tmp_path / "other"
    other.mkdir()
    (other / WEIGHTS).write_bytes((src / WEIGHTS).read_bytes())
    config = json.loads((src / "config.json").read_text()) | {"_class_name": "FluxTransformer2DModel"}
    (other / "config.json").write_text(json.dumps(config))
    assert main(["convert", str(other), str(tmp_path / "m"), "--to", "merged"]) == 2
    err = capsys.readouterr().err.strip()
    assert "names FluxTransformer2DModel, no model qkv-verify knows" in err and len(err.splitlines()) == 1


def test_load_merged_gives_the_merged_model_that_computes_what_diffusers_does(standard, tmp_path):
    """A converted 2.1 folder loads with load_merged (the merge read from its config.json) into a model whose
    outputs equal the fused model's built in memory, bit for bit, with its fused projections running."""
    from verify import load_merged
    from verify.checks.probes import count_calls

    src, _ = standard
    assert main(["convert", str(src), str(tmp_path / "m"), "--to", "merged", "--layout", "interleaved"]) == 0
    loaded = load_merged(tmp_path / "m")
    built = fused_21.fuse_model(m.build_model(m.model_config("tiny"), 0, torch.float32), "interleaved")
    inputs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in m.model_inputs(m.model_config("tiny"), m.FIXTURES["edit"], 0).items()}
    with torch.no_grad(), count_calls(loaded, ("to_qkv",)) as calls:
        got = loaded(**inputs).sample
    assert sum(calls.values()) == m.model_config("tiny")["num_layers"]
    with torch.no_grad():
        assert torch.equal(got, built(**inputs).sample)
