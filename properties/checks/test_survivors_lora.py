"""The LoRA commands' model shapes and tables as a user meets them: a pipeline folder given as --checkpoint, the
default layout, a fused update that does not split in three, the audit's table and its list of scales, the
comparison's scale columns and its table without file names. Written for mutants that survived the mutation run over
the verdict, message and write modules."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from properties.checkpoint_files import merged_checkpoint, standard_checkpoint
from properties.files.test_lora_files import STANDARD, random_modules, write_lora
from verify.checks import lora_checkpoint as checkpoint
from verify.checks import lora_compare
from verify.cli import main
from verify.files import lora_formats as formats
from verify.files import lora_mapping as mapping

PATHS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q", "transformer_blocks.0.attn.to_out.0",
         "transformer_blocks.1.img_mod.1"]


def _with_alphas(path: Path, alphas: dict[str, float]) -> Path:
    """The lightning file at `path` with module -> alpha changed."""
    tensors, metadata = formats.read_safetensors(path)
    for module, alpha in alphas.items():
        tensors[f"{module}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path, metadata=metadata)
    return path


# --- lora_checkpoint -----------------------------------------------------------------------------------------------


def test_a_pipeline_folder_is_read_through_its_transformer_folder(tmp_path):
    standard_checkpoint(tmp_path / "pipeline" / "transformer")
    lora = write_lora(tmp_path / "l.safetensors", "lightning", random_modules(STANDARD, PATHS, 2, 0), 2.0)
    out = tmp_path / "audit.json"
    assert main(["lora-audit", str(lora), "--checkpoint", str(tmp_path / "pipeline"), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["modules_matched"] == 4 and record["unmatched_keys"] == []
    direct = checkpoint.spec_from_checkpoint(tmp_path / "pipeline" / "transformer")
    assert checkpoint.spec_from_checkpoint(tmp_path / "pipeline").targets == direct.targets


def test_a_checkpoint_is_read_in_the_blocked_layout_by_default(tmp_path):
    std = standard_checkpoint(tmp_path / "std")
    assert checkpoint.spec_from_checkpoint(std).layout == "blocked"
    merged = merged_checkpoint(std, tmp_path / "merged")  # its config.json records the merge, blocked
    config = json.loads((merged / "config.json").read_text())
    (merged / "config.json").write_text(json.dumps({**config, "qkv_merge": {"naming": "seed", "layout": "blocked"}}))
    spec = checkpoint.spec_from_checkpoint(merged)
    assert spec.layout == "blocked" and "transformer_blocks.0.attn.to_qkv" in spec.targets


def test_a_fused_update_whose_rows_do_not_split_in_three_is_refused(tmp_path, capsys):
    """Sizes from the files (no --checkpoint, no --config): a fused q/k/v update of 64 rows (not a multiple of 3)."""
    path = tmp_path / "fused.safetensors"
    save_file({"transformer_blocks.0.attn.to_qkv.lora_down.weight": torch.ones(1, 64),
               "transformer_blocks.0.attn.to_qkv.lora_up.weight": torch.ones(64, 1)}, path)
    assert main(["lora-convert", str(path), str(tmp_path / "out.safetensors"), "--to", "standard"]) == 2
    err = capsys.readouterr().err
    assert "a fused q/k/v update of 64 rows, not three equal parts" in err
    # 90 rows split in three; their 30 x 64 parts are what the model is then taken to be
    lora = formats.parse({"transformer_blocks.0.attn.to_qkv.lora_down.weight": torch.ones(1, 64),
                          "transformer_blocks.0.attn.to_qkv.lora_up.weight": torch.ones(90, 1)}, "m")
    spec = checkpoint.spec_from_files([lora])
    assert spec.targets["transformer_blocks.0.attn.to_q"] == (30, 64)


# --- lora_audit.table, _fmt ----------------------------------------------------------------------------------------


def test_audit_prints_its_headline_the_module_table_and_four_scales_whole(tmp_path, capsys):
    lora = write_lora(tmp_path / "l.safetensors", "lightning", random_modules(STANDARD, PATHS, 2, 0), 2.0)
    _with_alphas(lora, dict(zip(PATHS, (1.0, 2.0, 4.0, 8.0))))  # rank 2: scales 0.5, 1, 2, 4
    capsys.readouterr()
    assert main(["lora-audit", str(lora), "--config", "tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "format          lightning (trained on a standard model; model is standard)"
    assert lines[1] == "LoRA modules    4 matched, 0 unmatched"
    header = next(i for i, line in enumerate(lines) if line.split() == ["module", "count", "rank", "scale"])
    assert [line.split() for line in lines[header + 1:header + 4]] == [
        ["transformer_blocks.*.attn.to_out.0", "1", "2", "2"],
        ["transformer_blocks.*.attn.to_q", "1", "2", "0.5"],
        ["transformer_blocks.*.attn.to_q", "1", "2", "1"]]
    assert "WARNING: scales disagree across modules: 0.5, 1, 2, 4; no single multiplier reproduces training" in lines


def test_more_than_four_scales_are_cut_short_with_their_count(tmp_path, capsys):
    paths = [*PATHS, "transformer_blocks.0.attn.add_k_proj"]
    lora = write_lora(tmp_path / "l.safetensors", "lightning", random_modules(STANDARD, paths, 2, 0), 2.0)
    _with_alphas(lora, dict(zip(paths, (1.0, 2.0, 4.0, 8.0, 16.0))))
    capsys.readouterr()
    assert main(["lora-audit", str(lora), "--config", "tiny"]) == 0
    assert "scales disagree across modules: 0.5, 1, 2, 4 ... (5 values);" in capsys.readouterr().out


# --- lora_compare.table, _scales -----------------------------------------------------------------------------------

QK = [f"transformer_blocks.{b}.attn.{n}" for b in (0, 1) for n in ("to_q", "add_k_proj")]


def test_compare_table_shows_each_sides_scales_and_a_dash_for_none(tmp_path, capsys):
    """A: to_q at two scales (blocks 0 and 1), no add_k_proj; B: everything at scale 2 (alpha 8, rank 4)."""
    modules = random_modules(STANDARD, QK, 4, 3)
    b = write_lora(tmp_path / "b.safetensors", "lightning", modules, 8.0)
    a = write_lora(tmp_path / "a.safetensors", "lightning", {p: m for p, m in modules.items() if "to_q" in p}, 8.0)
    _with_alphas(a, {"transformer_blocks.1.attn.to_q": 4.0})
    capsys.readouterr()
    assert main(["lora-compare", str(a), str(b), "--config", "tiny"]) == 1
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("transformer_blocks.*")}
    # pattern, count, max relative difference, B/A ratio, scale A, scale B, flag
    assert rows["transformer_blocks.*.attn.to_q"][4:6] == ["1,2", "2"]
    assert rows["transformer_blocks.*.attn.add_k_proj"][3:] == ["-", "-", "2", "DIFFERENT"]


def test_compare_table_of_a_record_without_file_names_calls_them_a_and_b(tmp_path):
    path = write_lora(tmp_path / "a.safetensors", "lightning", random_modules(STANDARD, QK, 4, 3), 8.0)
    lora = formats.read(path)
    plan = mapping.plan(lora, STANDARD)
    lines = lora_compare.table(lora_compare.compare(lora, lora, plan, plan)).splitlines()
    assert lines[0] == "A          A (lightning, standard layout; scale: alpha keys)"
    assert lines[1] == "B          B (lightning, standard layout; scale: alpha keys)"
    assert lines[-1].startswith("verdict: same delta W")
