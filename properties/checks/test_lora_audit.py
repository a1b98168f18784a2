"""The audit's numbers against reality: pair/tensor/matrix counts on the real 60-block architecture (meta device),
capacity against the true rank of the update, and each warning raised by the condition it names (and only then)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from properties.files.test_lora_files import STANDARD, random_modules, write_lora
from verify.checks import lora_checkpoint as checkpoint
from verify.checks.lora_audit import audit
from verify.files import lora_formats as formats
from verify.files import lora_mapping as mapping

FULL = checkpoint.spec_from_config("full")
DIFFSYNTH_EDIT = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                  "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")
WRITEUP_MERGED = ("to_qkv", "add_qkv_proj", "to_out.0", "to_add_out")


def targeted(spec: mapping.ModelSpec, suffixes: tuple[str, ...]) -> list[str]:
    """Module paths the way DiffSynth selects them: every module whose name ends with a target."""
    return [p for p in spec.targets if p.endswith(tuple("." + s for s in suffixes))]


def test_full_model_is_never_allocated():
    assert len(FULL.targets) > 800 and FULL.targets["transformer_blocks.59.attn.to_q"] == (3072, 3072)


def test_diffsynth_edit_list_counts(tmp_path):
    paths = targeted(FULL, DIFFSYNTH_EDIT)
    path = write_lora(tmp_path / "l.safetensors", "diffsynth", random_modules(FULL, paths, 1, 0, torch.bfloat16))
    record = audit(formats.read(path), mapping.plan(formats.read(path), FULL))
    assert (record["modules_matched"], record["tensors"], record["weights_changed"]) == (720, 1440, 720)
    assert record["unmatched_keys"] == []


def test_writeup_merged_list_counts(tmp_path):
    merged = mapping.retarget(FULL, "merged", "seed")
    paths = targeted(merged, WRITEUP_MERGED)
    path = write_lora(tmp_path / "l.safetensors", "diffsynth", random_modules(merged, paths, 1, 0, torch.bfloat16))
    lora = formats.read(path)
    on_merged, on_standard = audit(lora, mapping.plan(lora, merged)), audit(lora, mapping.plan(lora, FULL))
    assert (on_merged["modules_matched"], on_merged["tensors"], on_merged["weights_changed"]) == (240, 480, 240)
    assert (on_standard["modules_matched"], on_standard["tensors"], on_standard["weights_changed"]) == (240, 480, 480)


def _true_joint_rank(plan: mapping.Plan, prefix: str, names: tuple[str, ...]) -> int:
    """Rank of the stacked update [dq; dk; dv] of one stream, computed from the weights it changes."""
    by_target = {u.target: u.factors.delta() for u in plan.updates}
    return int(torch.linalg.matrix_rank(torch.cat([by_target[prefix + n] for n in names])))


@pytest.mark.parametrize("rank", [1, 3])
def test_fused_lora_has_a_third_of_the_capacity(tmp_path, rank):
    merged = mapping.retarget(STANDARD, "merged", "seed")
    fused = formats.read(write_lora(tmp_path / "f.safetensors", "diffsynth", random_modules(
        merged, ["transformer_blocks.0.attn.to_qkv"], rank, 0, torch.float64)))
    separate = formats.read(write_lora(tmp_path / "s.safetensors", "diffsynth", random_modules(
        STANDARD, [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"], rank, 1, torch.float64)))
    fused_plan, separate_plan = mapping.plan(fused, STANDARD), mapping.plan(separate, STANDARD)
    fused_cap, separate_cap = audit(fused, fused_plan)["capacity"], audit(separate, separate_plan)["capacity"]
    assert fused_cap["joint_rank"] * 3 == separate_cap["joint_rank"] == 3 * rank
    assert fused_cap["rank_reaching"] == separate_cap["rank_reaching"] == {"q": rank, "k": rank, "v": rank}
    names, prefix = ("to_q", "to_k", "to_v"), "transformer_blocks.0.attn."
    assert _true_joint_rank(fused_plan, prefix, names) == fused_cap["joint_rank"]
    assert _true_joint_rank(separate_plan, prefix, names) == separate_cap["joint_rank"]
    assert "a third of the capacity" in fused_cap["note"]


def _record(tmp_path, modules: dict, fmt: str = "lightning", alpha: float | None = 1.0, **extra) -> dict:
    path = write_lora(tmp_path / "w.safetensors", fmt, modules, alpha, **extra)
    lora = formats.read(path)
    return audit(lora, mapping.plan(lora, STANDARD))


def _warned(record: dict, text: str) -> bool:
    return any(text in w for w in record["warnings"])


PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_out.0"]


def test_clean_file_has_no_warnings(tmp_path):
    assert _record(tmp_path, random_modules(STANDARD, PATHS, 2, 0), alpha=2.0)["warnings"] == []


def test_all_zero_B_warns(tmp_path):
    modules = random_modules(STANDARD, PATHS, 2, 0)
    modules[PATHS[0]] = (modules[PATHS[0]][0], torch.zeros_like(modules[PATHS[0]][1]))
    assert _warned(_record(tmp_path, modules, alpha=2.0), "all-zero B in 1 of 2")


def test_nan_warns(tmp_path):
    modules = random_modules(STANDARD, PATHS, 2, 0)
    modules[PATHS[1]][0][0, 0] = float("nan")
    assert _warned(_record(tmp_path, modules, alpha=2.0), "NaN/Inf in 1 modules")


def test_underflow_warns_in_fp16_not_bf16(tmp_path):
    modules = {p: (A * 1e-5, B * 1e-5) for p, (A, B) in random_modules(STANDARD, PATHS, 1, 0).items()}
    record = _record(tmp_path, modules, alpha=0.01)
    assert _warned(record, "underflows to zero in float16") and not _warned(record, "zero in bfloat16")
    assert _warned(record, "baking the scale into B in float16")


def test_disagreeing_scales_warn_and_have_no_value(tmp_path):
    modules = random_modules(STANDARD, PATHS, 2, 0)
    path = write_lora(tmp_path / "d.safetensors", "lightning", modules, 2.0)
    tensors, metadata = formats.read_safetensors(path)
    tensors[f"{PATHS[0]}.alpha"] = torch.tensor(8.0)
    save_file(tensors, path, metadata=metadata)
    lora = formats.read(path)
    record = audit(lora, mapping.plan(lora, STANDARD))
    assert record["scale"]["value"] is None and (record["scale"]["min"], record["scale"]["max"]) == (1.0, 4.0)
    assert _warned(record, "scales disagree")


def test_alpha_ignored_by_a_convention_warns(tmp_path):
    modules = random_modules(STANDARD, PATHS, 2, 0)
    path = write_lora(tmp_path / "p.safetensors", "lightning", modules, 8.0)
    assert _warned(_record(tmp_path, modules, alpha=8.0), "DiffSynth")  # alpha / rank = 4: DiffSynth applies 1
    tensors, _ = formats.read_safetensors(path)
    tensors = {"transformer." + k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v
               for k, v in tensors.items()}
    save_file(tensors, path, metadata={"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 2})})
    lora = formats.read(path)
    assert _warned(audit(lora, mapping.plan(lora, STANDARD)), "alpha keys present but ignored")


@pytest.mark.parametrize("naming", ["seed", "diffusers"])
def test_load_report(tmp_path, naming):
    from verify.implementations.fused import fuse_model
    from verify.models.qwen_image import CONFIGS, build_model

    model = fuse_model(build_model(CONFIGS["tiny"], 0), naming)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    paths = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj", "img_in"]
    modules = random_modules(STANDARD, paths, 2, 0, torch.float64)
    lora = formats.read(write_lora(tmp_path / "l.safetensors", "lightning", modules, 1.0))
    report, _ = mapping.apply(model, mapping.plan(lora, mapping.spec_of(model)))
    text = "to_added_qkv" if naming == "diffusers" else "add_qkv_proj"
    by_target = {m.target: m for m in report.modules}
    assert (report.modules_matched, report.tensors_used, report.weights_changed) == (3, 9, 3)
    assert by_target["transformer_blocks.0.attn.to_qkv"].parts == ("q",)
    assert by_target[f"transformer_blocks.0.attn.{text}"].parts == ("v",)
    assert by_target["img_in"].parts is None and by_target["img_in"].sources == ("img_in",)
    after = model.state_dict()
    for target, m in by_target.items():
        W = before[f"{target}.weight"]
        assert m.relative_delta == pytest.approx(float((after[f"{target}.weight"] - W).norm() / W.norm()), rel=1e-9)


def test_spec_takes_the_layout_of_the_fused_model():
    from verify.errors import VerifyError
    from verify.implementations.fused import fuse_model
    from verify.models.qwen_image import CONFIGS, build_model

    model = fuse_model(build_model(CONFIGS["tiny"], 0), layout="interleaved")
    assert mapping.spec_of(model).layout == "interleaved"
    with pytest.raises(VerifyError, match="layout interleaved"):
        mapping.spec_of(model, "blocked")


def test_stacked_fused_lora_is_not_called_a_third(tmp_path):
    merged = mapping.retarget(STANDARD, "merged", "seed")
    separate = formats.read(write_lora(tmp_path / "s.safetensors", "diffsynth", random_modules(
        STANDARD, [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"], 2, 1, torch.float64)))
    (update,) = [u for u in mapping.plan(separate, merged).updates]
    fused = formats.read(write_lora(tmp_path / "f.safetensors", "diffsynth", {update.target: (update.factors.A,
                                                                                             update.factors.B)}))
    cap = audit(fused, mapping.plan(fused, STANDARD))["capacity"]
    assert cap["rank_reaching"] == {"q": 2, "k": 2, "v": 2} and cap["joint_rank"] == 6
    assert "a third" not in cap["note"] and "split among them" in cap["note"]
