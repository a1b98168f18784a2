"""Tensor parallelism of the merged model, checked by running it: the tiny seeded model, standard and merged, each
sharded by its own `_tp_plan` through diffusers' own styles (its `_resolve_tp_plan` and `_styles`, applied by torch's
`parallelize_module`) over a process group of CPU ranks (gloo), and the sharded merged outputs judged against the
unsharded standard model in fp64 by the relative-to-base rule (base: the standard model sharded the same way).

diffusers' `enable_parallelism` refuses a CPU mesh; the styles and DTensor sharding it would apply are the same
code, which is what a fused projection's sharding depends on: each rank must hold the q, k and v rows of the same
heads. A plan that cuts them apart (a naive "colwise" on a blocked to_qkv; a blocked cut of an interleaved one)
gives wrong outputs with no error, which this check catches.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from verify.checks.compare import Record, compare
from verify.checks.fixtures import FIXTURES, build_model, model_config, model_inputs
from verify.checks.tolerance import OUTPUTS
from verify.errors import VerifyError

PLANS = ("merged", "naive-colwise", "blocked-cut")  # the merged model's own plan, and two planted wrong ones
KINDS = ("tp", "ulysses", "ring")  # `report --parallel KIND=N`: tensor parallel; context parallel, two ways


def parse_parallel(text: str, device: str, processor: str) -> tuple[str, int]:
    """`report --parallel KIND=N` -> (kind, N), or a VerifyError saying why it cannot run here."""
    import torch

    kind, _, degree = text.partition("=")
    if kind not in KINDS or not degree.isdigit() or int(degree) < 2:
        raise VerifyError(f"--parallel {text}: expected tp=N, ulysses=N or ring=N with N >= 2")
    ranks = int(degree)
    if device == "cuda" and torch.cuda.device_count() < ranks:
        raise VerifyError(f"--parallel {text}: needs {ranks} CUDA devices, this machine has "
                          f"{torch.cuda.device_count()}")
    if kind != "tp" or device == "cuda":
        raise VerifyError(f"--parallel {text} --device {device}: not run by this version; it runs tensor parallelism "
                          "on CPU ranks (--parallel tp=N --device cpu)")
    if processor not in ("reference", "fast"):
        raise VerifyError(f"--parallel {text}: shards the product's processors reference or fast (pass one as "
                          f"--candidate), not {processor}")
    return kind, ranks


def tp_plan(model: torch.nn.Module, plan: str, layout: str) -> dict:
    """The merged `model`'s `_tp_plan` ("merged"), or a planted wrong one: every fused projection plain "colwise"
    ("naive-colwise"), or cut in three packed blocks as if blocked ("blocked-cut")."""
    from diffusers.hooks.tensor_parallel import PackedColwiseParallel

    own = dict(model._tp_plan)
    if plan == "merged":
        return own
    wrong = "colwise" if plan == "naive-colwise" else PackedColwiseParallel([1, 1, 1])
    fused = [key for key, style in own.items() if key.endswith(("to_qkv", "add_qkv_proj", "to_added_qkv"))]
    if not fused:
        raise VerifyError("the model's _tp_plan has no fused projection")
    return {**own, **dict.fromkeys(fused, wrong)}


def shard(model: torch.nn.Module, plan: dict, mesh) -> torch.nn.Module:
    """`model` sharded in place by `plan` as diffusers' apply_tensor_parallel shards it, on any device's mesh."""
    from diffusers.hooks.tensor_parallel import _resolve_tp_plan, _styles
    from torch.distributed.tensor.parallel import parallelize_module

    for submodule, relative in _resolve_tp_plan(model, plan):
        parallelize_module(submodule, mesh, _styles(relative))
    return model


def check_tensor_parallel(layout: str = "blocked", plan: str = "merged", ranks: int = 2, processor: str = "reference",
                          seed: int = 0, config: str = "tiny") -> list[Record]:
    """One record per fixture: the merged model sharded over `ranks` CPU ranks by `plan` vs the unsharded standard
    model (fp64), relative to the standard model sharded by its own plan, with the fused calls of every rank
    counted; every rank's outputs must agree. (Spawns the ranks: a script calling it needs a __main__ guard.)"""
    import torch.multiprocessing as mp

    if plan not in PLANS:
        raise VerifyError(f"unknown plan {plan!r}; expected one of {', '.join(PLANS)}")
    with tempfile.TemporaryDirectory() as folder:
        init = Path(folder) / "init"
        mp.spawn(_rank, args=(ranks, str(init), folder, layout, plan, processor, seed, config), nprocs=ranks,
                 join=True)
        results = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(ranks)]
    records = []
    for name in results[0]:
        ref, base, cand = (results[0][name][k] for k in ("ref", "base", "cand"))
        record = compare(f"tp{ranks}/{plan}/{layout}/{name}", "model", {"sample": ref}, {"sample": cand}, OUTPUTS,
                         torch.float64, "cpu", base={"sample": base},
                         fused_calls=sum(r[name]["fused_calls"] for r in results))
        disagree = [r for r in range(1, ranks) if not torch.equal(results[r][name]["cand"], cand)]
        if disagree:
            record.passed, record.message = False, f"ranks {disagree} computed other outputs than rank 0"
        records.append(record)
    return records


def _rank(rank: int, ranks: int, init: str, folder: str, layout: str, plan: str, processor: str, seed: int,
          config_name: str) -> None:
    """One rank: the unsharded standard model, then the standard and merged models sharded, on every fixture."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from verify.checks.probes import count_calls
    from verify.implementations.candidate import DEFAULT_FUSED_MODULES
    from verify.implementations.fused import fuse_model

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=ranks)
    try:
        mesh = init_device_mesh("cpu", (ranks,))
        config = model_config(config_name)
        std = build_model(config, seed)
        merged = fuse_model(copy.deepcopy(std), layout=layout, processor=processor)
        wrong = tp_plan(merged, plan, layout)
        unsharded = copy.deepcopy(std)
        shard(std, std._tp_plan, mesh)
        shard(merged, wrong, mesh)
        out = {}
        with torch.no_grad():
            for name, spec in FIXTURES.items():
                inputs = model_inputs(config, spec, seed)
                with count_calls(merged, DEFAULT_FUSED_MODULES) as calls:
                    cand = merged(**inputs).sample
                out[name] = {"ref": unsharded(**inputs).sample, "base": std(**inputs).sample, "cand": cand,
                             "fused_calls": sum(calls.values())}
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
