"""Convert properties on drawn configs and dtypes: round trips are byte-exact, and the merged checkpoint in the merged
model computes what the standard checkpoint computes in the standard model (fused calls counted)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from properties.strategies import expensive, input_specs, layouts, model_configs, namings, seeds
from verify.checks.compare import assert_passed
from verify.checks.equivalence import run_case
from verify.files.checkpoint import Checkpoint
from verify.files.convert import check, convert
from verify.files.model_config import model_config
from verify.implementations.loading import build_merged, load_standard
from verify.models import qwen_image
from verify.models.cases import Case, model_outputs

STORED = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
SHARDS = st.sampled_from(["8KB", "40KB", "10GB"])  # many small shards, a few, one file


def _tensors(folder: Path) -> dict[str, bytes]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: (t.dtype, t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
                    for k, t in load_file(f).items()})
    return out


def _save(config: dict, seed: int, dtype: torch.dtype, shard_size: str, path: Path) -> Path:
    qwen_image.build_model(config, seed, dtype).save_pretrained(path, max_shard_size=shard_size)
    return path


@settings(max_examples=expensive(4))
@given(config=model_configs(max_heads=3), seed=seeds(), dtype=STORED, shard_size=SHARDS, naming=namings(),
       layout=layouts())
def test_round_trip_is_byte_exact(config, seed, dtype, shard_size, naming, layout):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        std = _save(config, seed, dtype, shard_size, tmp / "std")
        convert(std, tmp / "m", "merged", naming, layout, warn=_no_warnings)
        convert(tmp / "m", tmp / "s", "standard", None, layout, warn=_no_warnings)
        a, b = _tensors(std), _tensors(tmp / "s")
        assert a == b and {d for d, _ in a.values()} == {dtype}
        assert check(std, tmp / "m").proven and check(tmp / "m", tmp / "s").proven


@settings(max_examples=expensive(8))
@given(config=model_configs(max_heads=3), spec=input_specs(), seed=seeds(), dtype=STORED, naming=namings(),
       layout=layouts(), low=st.sampled_from([None, torch.bfloat16, torch.float16]))
def test_converted_merged_checkpoint_computes_the_standard_function(config, spec, seed, dtype, naming, layout, low):
    """The standard checkpoint in diffusers' model vs its conversion in the merged model: fp64 and fp32 always."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        std = _save(config, seed, dtype, "40KB", tmp / "std")
        convert(std, tmp / "m", "merged", naming, layout, warn=_no_warnings)
        std_ckpt = Checkpoint(std)
        standard = load_standard(std_ckpt)
        merged = build_merged(Checkpoint(tmp / "m"), model_config(std_ckpt), layout)

    def user_merged(module: torch.nn.Module, component: str) -> torch.nn.Module:
        return torch.nn.Module.to(copy.deepcopy(merged), dtype=next(module.parameters()).dtype)

    case = Case(name="model/converted-checkpoint", component="model", build=lambda config, seed: standard,
                inputs=qwen_image.model_inputs, outputs=model_outputs, config=config, spec=spec)
    dtypes = (torch.float64, torch.float32) + ((low,) if low else ())
    records = run_case(case, dtypes=dtypes, seed=seed, candidate=user_merged, layout=layout)
    assert len(records) == len(dtypes)
    for record in records:
        assert_passed(record)
        assert record.fused_calls == 2 * config["num_layers"], record.fused_calls


def _no_warnings(message: str) -> None:
    raise AssertionError(f"unexpected warning: {message}")
