"""The report run: the full model, standard vs merged, over the fixtures in each dtype -> one summary dict.

The summary is data only (the verdict, every check's record, output statistics, environment, inputs); the
presentation lives in verify.render and never recomputes a verdict.
"""

from __future__ import annotations

import copy
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from verify import __version__, fixtures
from verify.cases import Case, model_outputs
from verify.checkpoint import Checkpoint
from verify.compare import Record, compare_exact
from verify.equivalence import evaluate
from verify.errors import VerifyError
from verify.fixtures import FIXTURES
from verify.fused import fuse_model
from verify.loading import is_merged, load_merged, load_standard, model_config
from verify.naming import detect_naming
from verify.state_dict import split_state_dict
from verify.tolerance import dtype_name

REQUIRED_DTYPES = (torch.float64, torch.float32)  # bugs hide in bf16 noise: no verdict without these


@dataclass(frozen=True)
class Options:
    """What `qkv-verify report` was asked to do."""

    checkpoint: Path | None = None
    merged_checkpoint: Path | None = None
    config: str = "tiny"
    layout: str = "blocked"
    device: str = "cpu"
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    seed: int = 0


@dataclass
class Subject:
    """The standard model (fp64, CPU) under test, its config, and how to make its merged counterpart."""

    standard: torch.nn.Module
    config: dict
    merged: torch.nn.Module | None  # the user's own merged weights, else None: fuse the standard model
    weight_check: Record | None


def load_subject(opts: Options) -> Subject:
    """Validate and load every input before anything runs or is written."""
    if opts.merged_checkpoint and not opts.checkpoint:
        raise VerifyError("--merged-checkpoint needs --checkpoint (the standard weights to compare against)")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise VerifyError("--device cuda: no CUDA device is available")
    if not opts.checkpoint:
        if opts.config == "full":
            raise VerifyError("--config full is not supported yet: its fp64 oracle (160 GB) needs block-by-block runs")
        config = fixtures.model_config(opts.config)
        return Subject(fixtures.build_model(config, opts.seed), config, None, None)
    std_ckpt = Checkpoint(opts.checkpoint)
    config = model_config(std_ckpt)
    standard = load_standard(std_ckpt)
    if not opts.merged_checkpoint:
        return Subject(standard, config, None, None)
    merged_ckpt = Checkpoint(opts.merged_checkpoint)
    if not is_merged(merged_ckpt):
        raise VerifyError(f"{opts.merged_checkpoint}: holds no fused to_qkv weights; is it a standard checkpoint?")
    merged = load_merged(merged_ckpt, config, opts.layout)
    return Subject(standard, config, merged, weight_check(std_ckpt, merged_ckpt, config, opts.layout))


def weight_check(std: Checkpoint, merged: Checkpoint, config: dict, layout: str) -> Record:
    """Split the merged weights in `layout` and require them bit-identical to the standard ones."""
    naming = detect_naming(merged.leaf_names())
    split = split_state_dict(merged.state_dict(), naming, layout, config.get("attention_head_dim", 128))
    return compare_exact(f"weights/split-{naming}-{layout}-equals-standard", "weights", std.state_dict(), split)


def run_report(opts: Options) -> dict:
    """Load, run every fixture in every dtype, and return the summary."""
    subject = load_subject(opts)
    dtypes = list(dict.fromkeys([*REQUIRED_DTYPES, *opts.dtypes]))
    notes = [f"{dtype_name(d)} added: a verdict needs fp64 and fp32 runs (bugs hide in bf16 noise)"
             for d in REQUIRED_DTYPES if d not in opts.dtypes]
    records = [subject.weight_check] if subject.weight_check else []
    stats = []
    for fixture, spec in tqdm(FIXTURES.items(), desc="fixtures", unit="fixture", leave=False):
        case = Case(name=f"model/{fixture}", component="model", build=lambda config, seed: subject.standard,
                    inputs=fixtures.model_inputs, outputs=model_outputs, config=subject.config, spec=spec)
        run = evaluate(case, dtypes, opts.device, opts.seed, merge=_merge_fn(subject))
        records += run.records
        stats.append(output_stats(fixture, "fp64", "oracle", run.ref))
        for dtype in dtypes:
            stats.append(output_stats(fixture, dtype_name(dtype), "standard", run.base[dtype]))
            stats.append(output_stats(fixture, dtype_name(dtype), "merged", run.cand[dtype]))
    return {
        "verdict": "pass" if all(r.passed for r in records) else "fail",
        "checks": [r.to_dict() for r in records],
        "output_stats": stats,
        "environment": environment(opts.device),
        "inputs": inputs_section(opts, subject, dtypes),
        "notes": notes,
    }


def _merge_fn(subject: Subject):
    """Merged model for a dtype: the user's merged weights if given, else the standard model fused here."""
    if subject.merged is None:
        return lambda module: fuse_model(module)

    def user_merged(module: torch.nn.Module) -> torch.nn.Module:
        p = next(module.parameters())
        return torch.nn.Module.to(copy.deepcopy(subject.merged), device=p.device, dtype=p.dtype)

    return user_merged


def output_stats(fixture: str, dtype: str, implementation: str, outputs: dict[str, torch.Tensor]) -> dict:
    """Summary statistics of one output tensor: more than the mean the write-up compared."""
    x = outputs["sample"].detach().double().cpu().flatten()
    finite = x[torch.isfinite(x)]
    return {
        "fixture": fixture, "dtype": dtype, "implementation": implementation,
        "mean": float(finite.mean()) if finite.numel() else None,
        "std": float(finite.std()) if finite.numel() > 1 else None,
        "min": float(finite.min()) if finite.numel() else None,
        "max": float(finite.max()) if finite.numel() else None,
        "nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum()), "numel": x.numel(),
    }


def environment(device: str) -> dict:
    import diffusers
    import numpy

    env = {
        "qkv_verify": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": numpy.__version__,
        "device": device,
    }
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    return env


def inputs_section(opts: Options, subject: Subject, dtypes: list[torch.dtype]) -> dict:
    return {
        "checkpoint": str(opts.checkpoint) if opts.checkpoint else None,
        "merged_checkpoint": str(opts.merged_checkpoint) if opts.merged_checkpoint else None,
        "config": None if opts.checkpoint else opts.config,
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in subject.config.items()},
        "layout": opts.layout if opts.merged_checkpoint else "blocked",
        "seed": opts.seed,
        "dtypes": [dtype_name(d) for d in dtypes],
        "device": opts.device,
        "fixtures": {name: asdict(spec) for name, spec in FIXTURES.items()},
    }
