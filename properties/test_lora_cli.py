"""`qkv-verify lora-audit` and `lora-convert` end to end: JSON fields, exit status 2 on bad input, exact round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from properties.test_lora_files import (
    FORMATS,
    STANDARD,
    WITH_ALPHA_KEYS,
    expected_scale,
    keys,
    random_modules,
    write_lora,
)
from verify.cli import main
from verify.fixtures import CONFIGS, build_model
from verify.fused import fuse_model
from verify.lora import checkpoint, formats, mapping

BOTH_STREAMS = [f"transformer_blocks.{b}.attn.{n}" for b in (0, 1)
                for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")]
OTHERS = ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.img_mod.1"]
MISSING = "transformer_blocks.7.attn.to_q"  # the tiny model has two blocks


def audit_json(tmp_path: Path, *argv: str) -> tuple[int, dict | None]:
    out = tmp_path / "audit.json"
    rc = main(["lora-audit", *argv, "--json", str(out)])
    return rc, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.parametrize("fmt", FORMATS)
def test_audit_fields(tmp_path, fmt):
    modules = random_modules(STANDARD, ["transformer_blocks.0.attn.add_k_proj", *OTHERS], 2, 0)
    path = write_lora(tmp_path / "l.safetensors", fmt, modules, 4.0)
    with safe_open(path, "pt") as f:  # a module the model lacks, added beside the real ones
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    a, b, alpha = keys(fmt, MISSING)
    tensors.update({a: torch.ones(2, 64), b: torch.ones(64, 2)} | ({alpha: torch.tensor(4.0)} if fmt in
                                                                     WITH_ALPHA_KEYS else {}))
    save_file(tensors, path, metadata=formats.read_safetensors(path)[1])
    rc, record = audit_json(tmp_path, str(path), "--config", "tiny")
    assert rc == 0
    per_module = 3 if fmt in WITH_ALPHA_KEYS else 2
    assert record["format"] == fmt and record["layout"] == "standard"
    assert record["modules_matched"] == 3 and record["tensors"] == 3 * per_module
    assert record["unmatched_keys"] == [("lora_unet_" + MISSING.replace(".", "_")) if fmt == "kohya" else MISSING]
    assert record["ranks"] == [2]
    assert record["scale"]["value"] == record["scale"]["min"] == record["scale"]["max"] == expected_scale(fmt, 4.0, 2)
    assert record["scale"]["source"] == {"diffusers": "metadata", "peft": "adapter config",
                                         "diffsynth": "assumed: no alpha found"}.get(fmt, "alpha keys")
    assert record["capacity"]["rank_reaching"] == {"q": 0, "k": 2, "v": 0}
    assert record["warnings"][0].startswith("1 modules of the file match nothing")


def _bad(tmp_path: Path, kind: str) -> list[str]:
    path = tmp_path / "bad.safetensors"
    if kind == "not safetensors":
        path.write_bytes(b"PK\x03\x04 a zip file")
    elif kind == "no match":
        write_lora(path, "lightning", random_modules(checkpoint.spec_from_config("small"),
                                                     ["transformer_blocks.3.attn.to_q"], 1, 0), 1.0)
    elif kind == "dora":
        save_file({"a.lora_A.weight": torch.ones(1, 2), "a.lora_B.weight": torch.ones(2, 1),
                   "a.lora_magnitude_vector": torch.ones(2)}, path)
    elif kind == "missing adapter config":
        write_lora(path, "diffusers", random_modules(STANDARD, OTHERS, 1, 0))
        return [str(path), "--config", "tiny", "--adapter-config", str(tmp_path / "none.json")]
    return [str(path), "--config", "tiny"]


@pytest.mark.parametrize("kind", ["missing file", "not safetensors", "no match", "dora", "missing adapter config"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, kind):
    rc, record = audit_json(tmp_path, *_bad(tmp_path, kind))
    err = capsys.readouterr().err
    assert rc == 2 and record is None
    assert err.startswith("qkv-verify: error: ") and err.count("\n") == 1 and "Traceback" not in err


def delta_by_module(path: Path) -> dict[str, torch.Tensor]:
    """module path -> alpha / rank * B @ A in fp64 (alpha / rank restated here, not taken from the library)."""
    with safe_open(path, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for k in t:
        if k.endswith(".lora_A.weight"):
            base = k.removesuffix(".lora_A.weight")
            A, B = t[k].double(), t[f"{base}.lora_B.weight"].double()
            out[base.removeprefix("diffusion_model.")] = float(t[f"{base}.alpha"]) / A.shape[0] * (B @ A)
    return out


@pytest.mark.parametrize("naming", ["seed", "diffusers"])
def test_convert_round_trip_keeps_delta(tmp_path, naming):
    modules = random_modules(STANDARD, BOTH_STREAMS[:5] + OTHERS, 2, 1, dtype=torch.float64)
    src = write_lora(tmp_path / "src.safetensors", "kohya", modules, 3.0)
    merged, back = tmp_path / "merged.safetensors", tmp_path / "back.safetensors"
    assert main(["lora-convert", str(src), str(merged), "--to", "merged", "--naming", naming, "--config", "tiny"]) == 0
    assert main(["lora-convert", str(merged), str(back), "--to", "standard", "--config", "tiny"]) == 0
    expected = {p: 3.0 / 2 * (B @ A) for p, (A, B) in modules.items()}
    assert delta_by_module(back).keys() == expected.keys()
    for p, d in delta_by_module(back).items():
        torch.testing.assert_close(d, expected[p], rtol=0, atol=0)
    fused = delta_by_module(merged)
    text = "to_added_qkv" if naming == "diffusers" else "add_qkv_proj"
    assert sorted(fused) == sorted(["transformer_blocks.0.attn.to_qkv", f"transformer_blocks.0.attn.{text}", *OTHERS])
    rc, record = audit_json(tmp_path, str(merged), "--config", "tiny")
    assert record["layout"] == "merged" and record["modules_matched"] == 4 and record["weights_changed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.json", "back.safetensors", "merged.safetensors",
                                                          "src.safetensors"]  # no temporary files left


def test_convert_refuses_to_overwrite_src(tmp_path, capsys):
    src = write_lora(tmp_path / "src.safetensors", "diffsynth", random_modules(STANDARD, OTHERS, 1, 0))
    before = src.read_bytes()
    assert main(["lora-convert", str(src), str(tmp_path / "." / "src.safetensors"), "--to", "merged",
                 "--config", "tiny"]) == 2
    assert src.read_bytes() == before and "overwrite" in capsys.readouterr().err


def _sharded(model: torch.nn.Module, folder: Path) -> Path:
    """A diffusers-layout checkpoint in two shards with an index, like the real one."""
    checkpoint.save_checkpoint(model, folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    (folder / checkpoint.WEIGHTS).unlink()
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file({k: sd[k] for k in part}, folder / shard)
    index = {"weight_map": {k: s for s, part in shards.items() for k in part}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("merged", [False, True])
def test_audit_against_checkpoint(tmp_path, merged):
    model = build_model(CONFIGS["tiny"], 0)
    if merged:
        fuse_model(model, "diffusers")
    folder = _sharded(model, tmp_path / "ckpt")
    lora = write_lora(tmp_path / "l.safetensors", "lightning", random_modules(STANDARD, BOTH_STREAMS, 1, 0), 1.0)
    rc, record = audit_json(tmp_path, str(lora), "--checkpoint", str(folder))
    assert rc == 0 and record["modules_matched"] == 12 and record["tensors"] == 36
    assert record["model_layout"] == ("merged" if merged else "standard")
    assert record["weights_changed"] == (4 if merged else 12)


def test_saved_checkpoint_holds_the_model(tmp_path):
    model = fuse_model(build_model(CONFIGS["tiny"], 0))
    folder = checkpoint.save_checkpoint(model, tmp_path / "fused")
    tensors, _ = formats.read_safetensors(folder / checkpoint.WEIGHTS)
    expected = model.state_dict()
    assert tensors.keys() == expected.keys() and all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert json.loads((folder / "config.json").read_text())["num_layers"] == CONFIGS["tiny"]["num_layers"]


def test_default_is_the_full_architecture(tmp_path):
    from properties.test_lora_audit import FULL

    paths = ["transformer_blocks.59.attn.add_v_proj", "transformer_blocks.0.txt_mod.1"]
    path = write_lora(tmp_path / "l.safetensors", "comfyui", random_modules(FULL, paths, 1, 0, torch.bfloat16))
    rc, record = audit_json(tmp_path, str(path))
    assert rc == 0 and record["modules_matched"] == 2 and record["unmatched_keys"] == []


def test_json_is_strict_even_with_nan(tmp_path):
    modules = random_modules(STANDARD, OTHERS, 1, 0)
    path = write_lora(tmp_path / "l.safetensors", "lightning", modules, float("nan"))
    rc, _ = audit_json(tmp_path, str(path), "--config", "tiny")

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    record = json.loads((tmp_path / "audit.json").read_text(), parse_constant=refuse)
    assert rc == 0 and any("NaN/Inf" in w for w in record["warnings"])


def test_convert_copies_unmatched_modules_and_says_so(tmp_path, capsys):
    modules = random_modules(STANDARD, OTHERS, 1, 0)
    src = write_lora(tmp_path / "src.safetensors", "lightning", modules, 1.0)
    tensors, metadata = formats.read_safetensors(src)
    extra = {f"{MISSING}.lora_down.weight": torch.ones(1, 64), f"{MISSING}.lora_up.weight": torch.ones(64, 1),
             f"{MISSING}.alpha": torch.tensor(1.0)}
    save_file(tensors | extra, src, metadata=metadata)
    dst = tmp_path / "dst.safetensors"
    assert main(["lora-convert", str(src), str(dst), "--to", "merged", "--config", "tiny"]) == 0
    out, _ = formats.read_safetensors(dst)
    assert all(torch.equal(out[k], v.double() if k.endswith("alpha") else v) for k, v in extra.items())
    assert MISSING in capsys.readouterr().out


def test_convert_renames_between_fused_namings(tmp_path):
    seed_merged = mapping.retarget(STANDARD, "merged", "seed")
    modules = random_modules(seed_merged, ["transformer_blocks.1.attn.add_qkv_proj"], 2, 0, torch.float64)
    src = write_lora(tmp_path / "seed.safetensors", "diffsynth", modules)
    dst = tmp_path / "diffusers.safetensors"
    argv = ["lora-convert", str(src), str(dst), "--to", "merged", "--naming", "diffusers", "--config", "tiny"]
    assert main(argv) == 0
    ((A, B),) = modules.values()
    assert delta_by_module(dst).keys() == {"transformer_blocks.1.attn.to_added_qkv"}
    assert torch.equal(delta_by_module(dst)["transformer_blocks.1.attn.to_added_qkv"], B @ A)
