"""`qkv-verify lora-compare A B`: the same delta W or not, through the command line.

One seeded separate q/k/v LoRA (rank 4, alpha 8: scale 2) is the original; from it the tests build what real
converters wrote: (a) separate q/k/v fused by averaging their three A matrices, (b) a correct stacked fusion whose scale
was computed from its stacked rank 3r (alpha / 3r: q, k and v three times too weak), and `lora-convert`'s own output.
The first two must be flagged against the original, the last must compare equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from properties.files.test_lora_files import STANDARD, random_modules, write_lora
from verify.checks import lora_checkpoint as checkpoint
from verify.cli import main
from verify.maths.naming import streams

RANK, ALPHA = 4, 8.0
QKV = [f"transformer_blocks.{b}.attn.{n}" for b in (0, 1) for s in streams("seed") for n in s.separate]
OTHERS = ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.1.img_mod.1"]


def original(tmp_path: Path, dtype=torch.float32) -> tuple[Path, dict]:
    modules = random_modules(STANDARD, QKV + OTHERS, RANK, 7, dtype)
    return write_lora(tmp_path / "original.safetensors", "lightning", modules, ALPHA), modules


def fused_file(path: Path, modules: dict, fuse, dtype=torch.float32) -> Path:
    """Each stream's q, k, v of `modules` fused by `fuse(As, Bs) -> (A, B, alpha)`, in ComfyUI keys; the other
    modules copied with the original alpha."""
    tensors = {}

    def put(target, A, B, alpha):
        tensors[f"diffusion_model.{target}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"diffusion_model.{target}.lora_B.weight"] = B.to(dtype).contiguous()
        tensors[f"diffusion_model.{target}.alpha"] = torch.tensor(alpha)

    for b in (0, 1):
        for s in streams("seed"):
            parts = [modules[f"transformer_blocks.{b}.attn.{n}"] for n in s.separate]
            put(f"transformer_blocks.{b}.attn.{s.fused}", *fuse([A for A, _ in parts], [B for _, B in parts]))
    for other in OTHERS:
        put(other, *modules[other], ALPHA)
    save_file(tensors, str(path))
    return path


def averaged_A(As, Bs):
    """Converter bug (a): one shared A, the mean of q's, k's and v's; B stacked; rank and alpha kept."""
    return torch.stack(As).mean(0), torch.cat(Bs), ALPHA


def stacked_rank_alpha(As, Bs):
    """Converter bug (b): an exact stacked fusion (A stacked, B block-diagonal, rank 3r) that keeps alpha, so a
    loader's alpha / rank is alpha / 3r: q, k and v three times too weak."""
    return torch.cat(As), torch.block_diag(*Bs), ALPHA


def stacked_rank_right(As, Bs):
    """The same fusion done right: alpha scaled with the rank (3 alpha / 3r = alpha / r)."""
    return torch.cat(As), torch.block_diag(*Bs), 3 * ALPHA


def compare(tmp_path: Path, a: Path, b: Path, *flags: str) -> tuple[int, dict]:
    out = tmp_path / "compare.json"
    out.unlink(missing_ok=True)
    rc = main(["lora-compare", str(a), str(b), "--json", str(out), *flags])
    return rc, json.loads(out.read_text()) if out.exists() else None


def by_target(record: dict) -> dict[str, dict]:
    return {m["target"]: m for m in record["modules"]}


@pytest.mark.parametrize("flags", [[], ["--config", "tiny"]], ids=["sizes-from-files", "config"])
def test_lora_convert_output_compares_equal_to_its_source(tmp_path, capsys, flags):
    src, _ = original(tmp_path)
    merged, back = tmp_path / "merged.safetensors", tmp_path / "back.safetensors"
    assert main(["lora-convert", str(src), str(merged), "--to", "merged", *flags]) == 0
    assert main(["lora-convert", str(merged), str(back), "--to", "standard", *flags]) == 0
    for converted in (merged, back):
        rc, record = compare(tmp_path, src, converted, *flags)
        assert rc == 0 and record["same"] and record["modules_different"] == 0
        assert record["modules_compared"] == len(QKV) + len(OTHERS) and not record["only_a"] + record["only_b"]
        assert all(m["relative"] <= 1e-15 for m in record["modules"])
    assert "verdict: same delta W" in capsys.readouterr().out
    assert record["layouts"] == {"a": "standard", "b": "standard"}


def test_a_correct_stacked_fusion_compares_equal(tmp_path):
    src, modules = original(tmp_path)
    rc, record = compare(tmp_path, src, fused_file(tmp_path / "right.safetensors", modules, stacked_rank_right))
    assert rc == 0 and record["same"] and record["layouts"]["b"] == "merged"


def test_averaged_A_is_flagged(tmp_path, capsys):
    src, modules = original(tmp_path)
    rc, record = compare(tmp_path, src, fused_file(tmp_path / "avg.safetensors", modules, averaged_A))
    assert rc == 1 and not record["same"]
    rows = by_target(record)
    assert all(not rows[p]["same"] and rows[p]["relative"] > 0.1 for p in QKV)
    assert all(rows[p]["same"] for p in OTHERS)
    assert record["modules_different"] == len(QKV)
    out = capsys.readouterr().out
    assert "verdict: different: 12 of 14 weights" in out and "DIFFERENT" in out


def test_scale_from_stacked_rank_is_flagged_as_a_third(tmp_path, capsys):
    src, modules = original(tmp_path)
    rc, record = compare(tmp_path, src, fused_file(tmp_path / "weak.safetensors", modules, stacked_rank_alpha))
    assert rc == 1 and record["modules_different"] == len(QKV)
    rows = by_target(record)
    for p in QKV:
        assert rows[p]["ratio"] == pytest.approx(1 / 3, rel=1e-12)
        assert rows[p]["relative"] == pytest.approx(2 / 3, rel=1e-12)
        assert rows[p]["scales_a"] == [ALPHA / RANK] and rows[p]["scales_b"] == [pytest.approx(ALPHA / (3 * RANK))]
    assert all(rows[p]["same"] and rows[p]["ratio"] == pytest.approx(1) for p in OTHERS)
    assert "0.3333" in capsys.readouterr().out


def test_a_module_only_one_file_touches_differs(tmp_path):
    src, modules = original(tmp_path)
    dropped = QKV[4]  # transformer_blocks.0.attn.add_k_proj
    fewer = write_lora(tmp_path / "fewer.safetensors", "kohya", {p: m for p, m in modules.items() if p != dropped},
                       ALPHA)
    rc, record = compare(tmp_path, src, fewer)
    assert rc == 1 and record["only_a"] == [dropped] and record["only_b"] == []
    assert by_target(record)[dropped]["relative"] == 1.0 and record["modules_different"] == 1
    rc, record = compare(tmp_path, fewer, src)
    assert rc == 1 and record["only_b"] == [dropped] and by_target(record)[dropped]["relative"] == "inf"  # strict JSON


def test_tolerance_follows_the_least_precise_dtype(tmp_path, capsys):
    """Baking the scale into B and storing it in bf16 rounds B once: within bf16's rtol (1.6e-2, torch.testing's),
    far outside fp32's; a 5% error in the same bf16 file is outside it."""
    src, modules = original(tmp_path)

    def baked(factor):
        return {p: (A, (B * (ALPHA / RANK) * factor).to(torch.bfloat16)) for p, (A, B) in modules.items()}

    rounded = write_lora(tmp_path / "bf16.safetensors", "diffsynth", baked(1.0))  # diffsynth: no alpha, scale 1
    rc, record = compare(tmp_path, src, rounded)
    assert rc == 0 and record["tolerance"]["dtype"] == "bf16" and record["tolerance"]["rtol"] == 1.6e-2
    assert max(m["relative"] for m in record["modules"]) > 1.3e-6  # fp32's rtol would have refused it
    assert "torch.testing's default rtol for bf16" in capsys.readouterr().out
    rc, record = compare(tmp_path, src, write_lora(tmp_path / "off.safetensors", "diffsynth", baked(1.05)))
    assert rc == 1 and record["modules_different"] == len(modules)


def test_layout_of_fused_files(tmp_path):
    """An interleaved fused file equals the original only when read as interleaved; without a model the head size
    is unknown, so --layout interleaved needs --checkpoint or --config."""
    src, _ = original(tmp_path)
    merged = tmp_path / "interleaved.safetensors"
    assert main(["lora-convert", str(src), str(merged), "--to", "merged", "--layout", "interleaved",
                 "--config", "tiny"]) == 0
    assert compare(tmp_path, src, merged, "--config", "tiny", "--layout", "interleaved")[0] == 0
    assert compare(tmp_path, src, merged, "--config", "tiny")[0] == 1
    assert compare(tmp_path, src, merged, "--layout", "interleaved")[0] == 2


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    src, _ = original(tmp_path)
    small = checkpoint.spec_from_config("small")
    other = write_lora(tmp_path / "small.safetensors", "lightning", random_modules(small, QKV[:1], RANK, 0), ALPHA)
    for argv in ([str(src), str(tmp_path / "missing.safetensors")], [str(src), str(other)],
                 [str(src), str(src), "--json", str(tmp_path / "no" / "such.json")]):
        capsys.readouterr()
        assert main(["lora-compare", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("qkv-verify: error: ") and err.count("\n") == 1
    assert main(["lora-compare", str(src), str(other)]) == 2
    assert "different model sizes" in capsys.readouterr().err
