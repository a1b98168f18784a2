"""Python API for users' own test suites: judge a merged-QKV implementation against diffusers (or a reference).

    from verify.testing import assert_candidate
    assert_candidate("my_pkg.fused:build")                 # attention, block and model; fp64, fp32, bf16, fp16

`check_candidate` returns the records (verify.checks.compare.Record); `assert_candidate` raises AssertionError with a
diffusers-style message for every failing one.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from verify.checks.compare import Record
from verify.checks.equivalence import run_case
from verify.implementations.candidate import Build, Implementation, resolve
from verify.models import DEFAULT_MODEL, load


def check_candidate(candidate: str | Build | Implementation, reference: str | Build | Implementation | None = None,
                    *, components: Iterable[str] = ("attention", "block", "model"),
                    dtypes: Iterable[torch.dtype] | None = None, device: str = "cpu", seed: int = 0,
                    fused_modules: str | None = None, layout: str = "blocked",
                    precision: str | None = None, model: str = DEFAULT_MODEL) -> list[Record]:
    """Every registry case of `model` (verify.models: qwen-image, qwen-image-2.1) and `components` (tiny seeded
    configs; outputs, and gradients where the case has them), the candidate against the reference (diffusers by
    default) in each dtype. `precision="fp32"` declares that the candidate computes in fp32 at best (its fp64 runs
    are judged at fp32's floor)."""
    candidate = resolve(candidate, fused_modules, precision)
    reference = reference if isinstance(reference, Implementation) else resolve(reference or "diffusers")
    components = tuple(components)
    return [r for case in load(model).CASES.values() if case.component in components
            for r in run_case(case, dtypes, device, seed, candidate=candidate, reference=reference, layout=layout)]


def assert_candidate(candidate: str | Build | Implementation, reference=None, **options) -> list[Record]:
    """check_candidate, then AssertionError naming each failure (case, dtype, tensor, mismatched share, worst
    element, first divergence); also when the candidate provides none of the components."""
    records = check_candidate(candidate, reference, **options)
    judged = [r for r in records if r.provided]
    if not judged:
        raise AssertionError(f"candidate provides none of the components checked: {records[0].message}"
                             if records else "no check ran")
    failed = [r for r in judged if not r.passed]
    if failed:
        raise AssertionError(f"{len(failed)} of {len(judged)} checks failed:\n" + "\n".join(map(describe, failed)))
    return records


def describe(record: Record) -> str:
    """One failing record as a line: case [dtype, device, rule]: message; first divergence."""
    where = f"; first divergence: {record.first_divergence}" if record.first_divergence else ""
    return f"{record.name} [{record.dtype}, {record.device}, {record.rule}]: {record.message}{where}"


def check_trajectory(candidate: str | Build | Implementation, reference: str | Build | Implementation | None = None,
                     *, steps: int = 20, true_cfg_scale: float | None = None,
                     dtypes: Iterable[torch.dtype] = (torch.float64, torch.float32), device: str = "cpu",
                     seed: int = 0, fused_modules: str | None = None, precision: str | None = None,
                     model: str = DEFAULT_MODEL, fixture: str = "text-to-image") -> list[dict]:
    """`qkv-verify sample`'s per-step records (summary.json's `trajectory`): the candidate's latents after each step
    of diffusers' pipeline against the fp64 oracle's, relative to the reference's, in each dtype; `fixture` as
    sample's --fixture (text-to-image, edit, edit-2511)."""
    from verify.checks.sampling import SampleOptions, run_sampling

    opts = SampleOptions(model=model, fixture=fixture, steps=steps, true_cfg_scale=true_cfg_scale,
                         dtypes=tuple(dtypes), device=device, seed=seed)
    result, _ = run_sampling(resolve(candidate, fused_modules, precision), resolve(reference or "diffusers"), opts)
    return result["trajectory"]


def assert_trajectory(candidate: str | Build | Implementation, reference=None, **options) -> list[dict]:
    """check_trajectory, then AssertionError naming the first failing step of each dtype and where it diverged."""
    records = check_trajectory(candidate, reference, **options)
    failed = [r for r in records if not r["passed"]]
    if failed:
        first = [r for r in failed if r["first_divergence"]]
        raise AssertionError(f"{len(failed)} of {len(records)} steps failed:\n" + "\n".join(
            f"{r['name']} [{r['dtype']}]: {r['message']}; first divergence: {r['first_divergence']}" for r in first))
    return records


def save_inputs(out, model: str = DEFAULT_MODEL, config: str = "tiny", seed: int = 0,
                components: Iterable[str] = ("attention", "block", "model"),
                dtypes: Iterable[torch.dtype] = (torch.float64, torch.float32, torch.bfloat16, torch.float16),
                fixtures: Iterable[str] | None = None) -> None:
    """Write the inputs folder an engine that cannot be imported runs (`qkv-verify inputs`): inputs, weights,
    manifest.json and README.txt, into `out` (written whole, then moved in); `fixtures`: names of the model's
    FIXTURES whose cases are written (default all)."""
    from verify.checks.engines import inputs_files
    from verify.files.folder import write_folder

    write_folder(out, inputs_files(model, config, seed, tuple(components), tuple(dtypes),
                                   tuple(fixtures) if fixtures else None))


def judge_outputs(outputs, inputs, reference: str | Build | Implementation | None = None,
                  precision: str | None = None, reference_outputs=None) -> dict:
    """`qkv-verify judge`'s summary (summary.json's content) of the outputs an engine wrote for the inputs folder
    `inputs`: the oracle and base computed here, each output judged by the relative-to-base rule (`precision="fp32"`:
    the engine computes in fp32 at best, its fp64 outputs judged at fp32's floor; `reference_outputs`: saved outputs,
    e.g. another machine's, in place of the reference run here as base). Input gradients the engine wrote for the
    manifest's cotangents are judged as report's gradients (inputs only); where it wrote none, not compared.
    Submodule outputs it wrote under the standard's names (the manifest's "modules") locate a failing output's
    first_divergence."""
    from verify.checks.engines import judge_folder

    return judge_folder(outputs, inputs, reference, precision, reference_outputs)
