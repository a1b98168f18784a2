"""`qkv-verify lora-audit` and `lora-convert` end to end: JSON fields, exit status 2 on bad input, exact round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from properties.files.test_lora_files import (
    FORMATS,
    STANDARD,
    WITH_ALPHA_KEYS,
    expected_scale,
    keys,
    random_modules,
    write_lora,
)
from verify.checks import lora_checkpoint as checkpoint
from verify.cli import main
from verify.files import lora_formats as formats
from verify.files import lora_mapping as mapping
from verify.implementations.fused import fuse_model
from verify.models.qwen_image import CONFIGS, build_model

BOTH_STREAMS = [f"transformer_blocks.{b}.attn.{n}" for b in (0, 1)
                for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")]
OTHERS = ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.img_mod.1"]
MISSING = "transformer_blocks.7.attn.to_q"  # the tiny model has two blocks


def audit_json(tmp_path: Path, *argv: str) -> tuple[int, dict | None]:
    out = tmp_path / "audit.json"
    rc = main(["lora-audit", *argv, "--json", str(out), "--force"])  # one record file, rewritten by each call
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
    from properties.checks.test_lora_audit import FULL

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
    modules = random_modules(STANDARD, [BOTH_STREAMS[0], *OTHERS], 1, 0)
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


# --- lora-audit --strict and the assumed scale -------------------------------------------------------------------

NO_ALPHA_WARNING = "scale 1 assumed: no alpha found; PEFT's default lora_alpha is 8, which would give 8/r"


def test_strict_exits_1_on_any_warning_and_0_without(tmp_path, capsys):
    clean = write_lora(tmp_path / "clean.safetensors", "lightning", random_modules(STANDARD, OTHERS, 2, 0), 2.0)
    rc, record = audit_json(tmp_path, str(clean), "--config", "tiny", "--strict")
    assert rc == 0 and record["warnings"] == []
    scaled = write_lora(tmp_path / "scaled.safetensors", "lightning", random_modules(STANDARD, OTHERS, 2, 0), 8.0)
    assert audit_json(tmp_path, str(scaled), "--config", "tiny")[0] == 0  # warnings alone never fail the audit
    rc, record = audit_json(tmp_path, str(scaled), "--config", "tiny", "--strict")
    assert rc == 1 and len(record["warnings"]) == 1 and "alpha present" in record["warnings"][0]
    assert "--strict: 1 warning(s)" in capsys.readouterr().out


def _peft_folder(folder: Path, alpha: float | None, targets=("to_q", "to_k", "to_v", "to_out.0")) -> Path:
    """What PEFT's save_pretrained writes for the tiny model (adapter_model.safetensors + adapter_config.json),
    with adapter_config.json removed when `alpha` is None."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_model(CONFIGS["tiny"], 0), LoraConfig(
        r=4, lora_alpha=alpha or 8, target_modules=list(targets), init_lora_weights=False))
    model.save_pretrained(str(folder))
    if alpha is None:
        (folder / "adapter_config.json").unlink()
    return folder


@pytest.mark.parametrize("where", ["peft folder without adapter_config.json", "diffusers file without metadata"])
def test_no_alpha_warns_with_peft_default(tmp_path, where):
    if where.startswith("peft"):
        path = _peft_folder(tmp_path / "adapter", None)
    else:
        path = write_lora(tmp_path / "l.safetensors", "diffusers", random_modules(STANDARD, OTHERS, 4, 0))
    rc, record = audit_json(tmp_path, str(path), "--config", "tiny")
    assert rc == 0 and record["scale"]["value"] == 1.0 and record["scale"]["source"] == "assumed: no alpha found"
    (warning,) = [w for w in record["warnings"] if w.startswith(NO_ALPHA_WARNING)]
    assert "8/4 = 2" in warning and "--adapter-config" in warning
    assert audit_json(tmp_path, str(path), "--config", "tiny", "--strict")[0] == 1


@pytest.mark.parametrize("fmt", ["kohya", "lightning", "comfyui", "diffsynth"])
def test_formats_whose_convention_is_scale_1_do_not_warn_of_peft(tmp_path, fmt):
    path = write_lora(tmp_path / "l.safetensors", fmt, random_modules(STANDARD, OTHERS, 4, 0))
    rc, record = audit_json(tmp_path, str(path), "--config", "tiny", "--strict")
    assert rc == 0 and record["warnings"] == [] and record["scale"]["value"] == 1.0


# --- PEFT save_pretrained folders --------------------------------------------------------------------------------

def test_peft_folder_is_read_by_audit_and_convert(tmp_path, capsys):
    folder = _peft_folder(tmp_path / "adapter", 8.0)
    rc, record = audit_json(tmp_path, str(folder), "--config", "tiny")
    assert rc == 0 and record["format"] == "peft" and record["modules_matched"] == 8
    assert record["scale"] == {"value": 2.0, "min": 2.0, "max": 2.0, "source": "adapter config"}
    merged = tmp_path / "merged.safetensors"
    assert main(["lora-convert", str(folder), str(merged), "--to", "merged", "--config", "tiny"]) == 0
    assert main(["lora-compare", str(folder), str(merged)]) == 0
    capsys.readouterr()
    inside = folder / "adapter_model.safetensors"
    before = inside.read_bytes()
    assert main(["lora-convert", str(folder), str(inside), "--to", "merged", "--force"]) == 2
    assert inside.read_bytes() == before and "overwrite the source" in capsys.readouterr().err


def test_diffusers_save_lora_weights_folder_is_read(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    write_lora(folder / "pytorch_lora_weights.safetensors", "diffusers", random_modules(STANDARD, OTHERS, 2, 0), 4.0)
    rc, record = audit_json(tmp_path, str(folder), "--config", "tiny")
    assert rc == 0 and record["format"] == "diffusers" and record["scale"]["value"] == 2.0


@pytest.mark.parametrize("content, message", [({}, "a folder without adapter_model.safetensors"),
                                              ({"adapter_model.bin": b"pickle"}, "a pickle"),
                                              ({"adapter_model.safetensors": b"", "pytorch_lora_weights.safetensors":
                                                b""}, "pass the file you mean")])
def test_folder_without_safetensors_exits_2(tmp_path, capsys, content, message):
    (tmp_path / "adapter").mkdir()
    for name, data in content.items():
        (tmp_path / "adapter" / name).write_bytes(data)
    rc, _ = audit_json(tmp_path, str(tmp_path / "adapter"), "--config", "tiny")
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1


def test_report_reads_a_peft_folder(tmp_path):
    folder = _peft_folder(tmp_path / "adapter", 8.0)
    out = tmp_path / "report"
    assert main(["report", "--lora", str(folder), "--out", str(out), "--dtypes", "fp64,fp32"]) == 0
    lora = json.loads((out / "summary.json").read_text())["lora"]
    assert lora["format"] == "peft" and lora["modules_matched"] == 8 and lora["scale"]["value"] == 2.0


# --- lora-convert: existing DST, nothing to convert, sizes from the file -----------------------------------------

def test_convert_refuses_an_existing_dst_without_force(tmp_path, capsys):
    src = write_lora(tmp_path / "src.safetensors", "lightning", random_modules(STANDARD, BOTH_STREAMS, 2, 0), 2.0)
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"the user's file")
    mtime = dst.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["lora-convert", str(src), str(dst), "--to", "merged", "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err == f"qkv-verify: error: {dst}: exists; pass --force to replace it\n"
    assert dst.read_bytes() == b"the user's file" and dst.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst.safetensors", "src.safetensors"]
    assert main(["lora-convert", str(src), str(dst), "--to", "merged", "--config", "tiny", "--force"]) == 0
    assert formats.read(dst).alpha_source == "alpha keys"


@pytest.mark.parametrize("layout, to, naming, says", [
    ("standard", "standard", "seed", "already in the standard layout"),
    ("seed", "merged", "seed", "already in the merged layout with the seed naming"),
    ("diffusers", "merged", "diffusers", "already in the merged layout with the diffusers naming"),
    ("none", "merged", "seed", "already in the merged layout"),  # no q/k/v: the same in both layouts
])
def test_convert_to_the_layout_it_is_in_exits_2(tmp_path, capsys, layout, to, naming, says):
    spec = STANDARD if layout in ("standard", "none") else mapping.retarget(STANDARD, "merged", layout)
    paths = OTHERS if layout == "none" else [p for p in spec.targets if ".0.attn." in p and "to_out" not in p]
    src = write_lora(tmp_path / "src.safetensors", "comfyui", random_modules(spec, paths, 2, 0), 2.0)
    dst = tmp_path / "dst.safetensors"
    capsys.readouterr()
    assert main(["lora-convert", str(src), str(dst), "--to", to, "--naming", naming]) == 2
    err = capsys.readouterr().err
    assert says in err and "nothing to convert" in err and err.count("\n") == 1 and not dst.exists()


def _merged_small_lora(path: Path) -> tuple[Path, dict]:
    """A fused LoRA made for the small model (which the default full-size model does not fit), with its separate
    q/k/v factors."""
    small = checkpoint.spec_from_config("small")
    fused = mapping.retarget(small, "merged", "seed")
    modules = random_modules(fused, ["transformer_blocks.3.attn.to_qkv", "transformer_blocks.1.attn.add_qkv_proj",
                                     "transformer_blocks.2.attn.to_out.0"], 3, 0, torch.float64)
    return write_lora(path, "comfyui", modules, 6.0), modules


def test_convert_takes_qkv_sizes_from_the_file_without_a_model(tmp_path):
    src, modules = _merged_small_lora(tmp_path / "merged.safetensors")
    dst = tmp_path / "standard.safetensors"
    assert main(["lora-convert", str(src), str(dst), "--to", "standard"]) == 0
    got = delta_by_module(dst)
    for path, (A, B) in modules.items():
        expected = 6.0 / 3 * (B @ A)
        if path.endswith("to_out.0"):
            assert torch.equal(got[path], expected)
            continue
        prefix, leaf = path.rsplit(".", 1)
        names = {"to_qkv": ("to_q", "to_k", "to_v"), "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj")}
        thirds = expected.chunk(3)  # Qwen-Image's q, k and v are equal: a blocked fused B splits in three
        for name, third in zip(names[leaf], thirds):
            torch.testing.assert_close(got[f"{prefix}.{name}"], third, rtol=1e-15, atol=0)
    assert main(["lora-compare", str(src), str(dst)]) == 0


def test_convert_still_checks_against_a_model_when_given(tmp_path, capsys):
    src, _ = _merged_small_lora(tmp_path / "merged.safetensors")
    dst = tmp_path / "standard.safetensors"
    assert main(["lora-convert", str(src), str(dst), "--to", "standard", "--config", "small"]) == 0
    dst.unlink()
    capsys.readouterr()
    assert main(["lora-convert", str(src), str(dst), "--to", "standard", "--config", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "a LoRA for another model size?" in err and "--checkpoint" not in err and not dst.exists()


def test_audit_hint_names_checkpoint_when_the_default_model_does_not_fit(tmp_path, capsys):
    src, _ = _merged_small_lora(tmp_path / "merged.safetensors")
    capsys.readouterr()
    rc, record = audit_json(tmp_path, str(src))
    err = capsys.readouterr().err
    assert rc == 2 and record is None and err.count("\n") == 1
    assert "the full-size Qwen-Image was assumed: pass --checkpoint DIR" in err and "--config" in err
    assert audit_json(tmp_path, str(src), "--config", "small")[0] == 0
