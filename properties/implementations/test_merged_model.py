"""The merged model as a diffusers and PEFT user handles it, judged against PEFT's and diffusers' own outputs (fp64,
element-wise): LoRA adapters survive fuse and unfuse exactly (or are refused before anything changes), LoRA files
load as exact adapters in either layout, a saved merged model records its merge and loads back exactly, and
gradient checkpointing, torch.compile(fullgraph=True), .to(dtype) and requires_grad_ keep working."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig

from verify import VerifyError, fuse_model, load_lora, load_merged, unfuse_model
from verify.checks.inputs import cast_inputs
from verify.checks.probes import count_calls
from verify.implementations import adapters
from verify.implementations.candidate import DEFAULT_FUSED_MODULES
from verify.models import qwen_image

CONFIG = qwen_image.model_config("tiny")
SEPARATE = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"]
TIGHT = dict(rtol=0, atol=1e-12)  # fp64: the same function up to rounding (planted bugs move outputs by > 1e-3)


def _model():
    return qwen_image.build_model(CONFIG, 0)


def _inputs():
    return qwen_image.model_inputs(CONFIG, qwen_image.FIXTURES["text-to-image"], 0)


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**_inputs()).sample


def _with_adapters(model):
    """Two PEFT adapters, both active: ranks and alphas that differ per module, and one that skips k."""
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=SEPARATE,
                                 rank_pattern={"to_k": 2}, alpha_pattern={"add_v_proj": 3}), adapter_name="a")
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_v"]),
                      adapter_name="b")
    model.set_adapters(["a", "b"])
    return model.double()


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_peft_adapters_survive_fuse_and_unfuse_exactly(layout):
    model = _with_adapters(_model())
    expected = _out(model)
    assert not torch.allclose(expected, _out(_model()), **TIGHT), "the adapters change the output"
    fuse_model(model, layout=layout)
    attn = model.transformer_blocks[0].attn
    assert adapters.is_lora(attn.to_qkv) and set(attn.to_qkv.lora_A) == {"a", "b"}
    assert attn.to_qkv.lora_A["a"].weight.shape[0] == 4 + 2 + 4, "A stacked: ranks of q, k, v"
    assert model.peft_config["a"].target_modules == {"to_qkv", "add_qkv_proj", "to_out.0"}
    with count_calls(model, DEFAULT_FUSED_MODULES) as calls:
        torch.testing.assert_close(_out(model), expected, **TIGHT)
    assert sum(calls.values()) == 2 * CONFIG["num_layers"]
    unfuse_model(model)
    assert adapters.is_lora(model.transformer_blocks[0].attn.to_k)
    torch.testing.assert_close(_out(model), expected, **TIGHT)


def test_a_dropped_adapter_and_a_b_split_in_the_wrong_order_are_caught(monkeypatch):
    model = _with_adapters(_model())
    expected = _out(model)
    dropped = copy.deepcopy(model)
    monkeypatch.setattr(adapters, "fuse_adapters", lambda *a, **k: {})
    fuse_model(dropped)
    assert not torch.allclose(_out(dropped), expected, rtol=0, atol=1e-6)
    monkeypatch.undo()
    fuse_model(model)
    split = adapters.split_adapters
    monkeypatch.setattr(adapters, "split_adapters", lambda *a: split(*a)[::-1])
    unfuse_model(model)
    assert not torch.allclose(_out(model), expected, rtol=0, atol=1e-6)


def test_what_cannot_fuse_exactly_is_refused_before_anything_changes():
    dora = _model()
    dora.add_adapter(LoraConfig(r=2, use_dora=True, init_lora_weights=False, target_modules=["to_q"]))
    with pytest.raises(VerifyError, match="DoRA"):
        fuse_model(dora)
    assert all(hasattr(b.attn, "to_q") and not hasattr(b.attn, "to_qkv") for b in dora.transformer_blocks)
    dropout = _model()
    dropout.add_adapter(LoraConfig(r=2, lora_dropout=0.1, init_lora_weights=False, target_modules=["to_q"]),
                        adapter_name="p")
    dropout.add_adapter(LoraConfig(r=2, lora_dropout=0.2, init_lora_weights=False, target_modules=["to_k"]),
                        adapter_name="q")
    dropout.add_adapter(LoraConfig(r=2, lora_dropout=0.0, init_lora_weights=False, target_modules=["to_q", "to_k"]),
                        adapter_name="r")
    fuse_model(copy.deepcopy(dropout))  # p and q each sit on one projection only: one dropout per adapter
    mixed = _model()
    mixed.add_adapter(LoraConfig(r=2, lora_dropout=0.1, init_lora_weights=False, target_modules=["to_q", "to_k"]),
                      adapter_name="m")
    mixed.transformer_blocks[1].attn.to_k.lora_dropout["m"].p = 0.3
    with pytest.raises(VerifyError, match="different dropout"):
        fuse_model(mixed)
    assert hasattr(mixed.transformer_blocks[0].attn, "to_q"), "block 0 was valid, yet nothing changed"


@pytest.fixture(scope="module")
def peft_lora(tmp_path_factory):
    """A LoRA file saved by diffusers from PEFT adapters on the standard model, and that model's output (PEFT's)."""
    folder = tmp_path_factory.mktemp("lora")
    model = _model()
    model.add_adapter(LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=SEPARATE))
    model.double()
    model.save_lora_adapter(str(folder))
    return folder / "pytorch_lora_weights.safetensors", _out(model)


@pytest.mark.parametrize("merged", [True, False], ids=["onto-merged", "onto-standard"])
def test_load_lora_installs_exact_peft_adapters(peft_lora, merged):
    path, expected = peft_lora
    model = fuse_model(_model()) if merged else _model()
    report = load_lora(model, path)
    assert report.modules_matched == len(SEPARATE) * CONFIG["num_layers"] and not report.unmatched_keys
    assert report.weights_changed == (3 if merged else len(SEPARATE)) * CONFIG["num_layers"]
    torch.testing.assert_close(_out(model), expected, **TIGHT)
    trainable = [n for n, p in model.named_parameters() if "lora_" in n]
    assert trainable, "the adapters are PEFT parameters, ready to train"
    if merged:
        unfuse_model(model)
        torch.testing.assert_close(_out(model), expected, **TIGHT)


def test_load_lora_refuses_a_file_where_nothing_matches(tmp_path):
    from safetensors.torch import save_file

    save_file({"transformer_blocks.7.attn.to_q.lora_down.weight": torch.ones(2, 64),
               "transformer_blocks.7.attn.to_q.lora_up.weight": torch.ones(64, 2)}, str(tmp_path / "x.safetensors"))
    model = fuse_model(_model())
    with pytest.raises(VerifyError, match="no LoRA module matched the model"):
        load_lora(model, tmp_path / "x.safetensors")
    assert not any(adapters.is_lora(m) for m in model.modules())


def test_a_loaded_lora_saves_with_diffusers_and_loads_back(peft_lora, tmp_path):
    path, expected = peft_lora
    model = fuse_model(_model())
    load_lora(model, path)
    model.save_lora_adapter(str(tmp_path))
    again = fuse_model(_model())
    load_lora(again, tmp_path / "pytorch_lora_weights.safetensors")
    torch.testing.assert_close(_out(again), expected, **TIGHT)
    again.unload_lora()
    torch.testing.assert_close(_out(again), _out(_model()), **TIGHT)


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_save_pretrained_records_the_merge_and_load_merged_reads_it_exactly(layout, tmp_path):
    model = fuse_model(_model(), naming="diffusers", layout=layout)
    expected = _out(model)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["qkv_merge"] == {"naming": "diffusers", "layout": layout}
    loaded = load_merged(tmp_path / "m")
    assert hasattr(loaded.transformer_blocks[0].attn, "to_added_qkv")
    torch.testing.assert_close(_out(loaded), expected, rtol=0, atol=0)
    other = "interleaved" if layout == "blocked" else "blocked"
    with pytest.raises(VerifyError, match=f"records layout {layout}"):
        load_merged(tmp_path / "m", layout=other)
    del config["qkv_merge"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(VerifyError, match="never guessed"):
        load_merged(tmp_path / "m")
    torch.testing.assert_close(_out(load_merged(tmp_path / "m", layout=layout)), expected, rtol=0, atol=0)
    unfuse_model(model)
    assert model.config.get("qkv_merge") is None, "an unfused model says it is no longer merged"


def test_gradient_checkpointing_dtype_and_requires_grad_keep_working():
    model = fuse_model(_model())
    reference = fuse_model(_model())
    model.enable_gradient_checkpointing()
    model.train()
    reference.train()
    inputs = _inputs()
    for m in (model, reference):
        m(**inputs).sample.square().sum().backward()
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], **TIGHT)
    half = torch.nn.Module.to(copy.deepcopy(model).eval(), torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = half(**cast_inputs(inputs, torch.bfloat16, "cpu")).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters())


def test_torch_compile_fullgraph_runs_the_fused_model():
    model = fuse_model(_model()).eval()
    expected = _out(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        out = compiled(**_inputs()).sample
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_the_readme_example_runs(peft_lora, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    code = re.search(r"```python\n# example: merged-model\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_lora.safetensors").write_bytes(peft_lora[0].read_bytes())
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["report"].modules_matched == len(SEPARATE) * CONFIG["num_layers"]
    assert json.loads((tmp_path / "merged-model" / "config.json").read_text())["qkv_merge"]["layout"] == "blocked"


def test_convert_records_the_merge_and_honours_it(tmp_path):
    """qkv-verify convert writes qkv_merge into a merged DST's config.json (load_merged then needs no layout) and
    drops it from a standard one; converting back refuses a --layout that contradicts the record."""
    from verify.cli import main

    std = tmp_path / "std"
    _model().save_pretrained(std)
    expected = _out(fuse_model(_model(), layout="interleaved"))
    assert main(["convert", str(std), str(tmp_path / "m"), "--to", "merged", "--layout", "interleaved"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["qkv_merge"]["layout"] == "interleaved"
    torch.testing.assert_close(_out(load_merged(tmp_path / "m")), expected, rtol=0, atol=0)
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "bad"), "--to", "standard", "--layout",
                 "blocked"]) == 2
    assert not (tmp_path / "bad").exists()
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "back"), "--to", "standard"]) == 0
    assert "qkv_merge" not in json.loads((tmp_path / "back" / "config.json").read_text())
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "back"), "--check"]) == 0


def test_a_lora_loaded_on_the_standard_model_fuses_exactly(peft_lora):
    path, expected = peft_lora
    model = _model()
    load_lora(model, path)
    fuse_model(model)
    assert adapters.is_lora(model.transformer_blocks[0].attn.to_qkv)
    torch.testing.assert_close(_out(model), expected, **TIGHT)


def test_lora_audit_on_a_merged_folder_refuses_a_layout_its_config_contradicts(peft_lora, tmp_path, capsys):
    from verify.cli import main

    fuse_model(_model(), layout="interleaved").save_pretrained(tmp_path / "m")
    path, _ = peft_lora
    assert main(["lora-audit", str(path), "--checkpoint", str(tmp_path / "m")]) == 2
    assert "records layout interleaved" in capsys.readouterr().err
    assert main(["lora-audit", str(path), "--checkpoint", str(tmp_path / "m"), "--layout", "interleaved"]) == 0
