"""Tensor and context parallelism of the merged model, checked by running it on a process group of ranks the check
launches itself (gloo on CPU ranks, NCCL on one GPU a rank): the seeded model (any of verify.models), standard and
merged, each made parallel as diffusers makes it, and the parallel merged outputs judged against the unsharded standard
model in fp64 by the relative-to-base rule (base: the standard model made parallel the same way, in the same dtype).
Each fixture runs through the forward; so do the model's whole-model cases of another path (Qwen-Image 2.1's prefix KV
cache: every rank caches the K and V of its own heads, and the cached decode is judged beside the full prefill).

On cuda, diffusers' own `enable_parallelism` makes both models parallel (`TensorParallelConfig` by the model's
`_tp_plan`; `ContextParallelConfig` with Ulysses or ring by its `_cp_plan`). It refuses a CPU mesh, so on the CPU its
steps are taken with its own parts: its TP styles (`_resolve_tp_plan`, `_styles`) applied by torch's
`parallelize_module`; its `ContextParallelConfig` set up on a CPU mesh, handed to every attention processor, and its
split/gather hooks applied by the `_cp_plan`. Ring attention merges its steps by the log-sum-exp, which only GPU
backends return (cuDNN's, in bf16 or fp16), so ring runs on cuda only, in bf16; the other kinds run in fp64.
Planted, and caught: a naive "colwise" on a blocked to_qkv and a blocked cut of an interleaved one (each rank's shard
mixes the q, k and v of different heads), and a processor that drops the parallel config (each rank attends to its
own sequence shard only); each gives wrong outputs, no error.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch

from verify import models
from verify.checks.compare import Record, compare
from verify.checks.tolerance import OUTPUTS
from verify.errors import VerifyError

# kind -> the merged model's own plan, then the planted wrong ones
PLANS = {"tp": ("merged", "naive-colwise", "blocked-cut"), "ulysses": ("merged", "drops-parallel-config"),
         "ring": ("merged", "drops-parallel-config")}
KINDS = tuple(PLANS)  # `report --parallel KIND=N`: tensor parallel; context parallel, two ways
SPLIT_SEQUENCES = ("hidden_states", "encoder_hidden_states")  # the inputs a `_cp_plan` splits along the sequence
RING_BACKEND = "_native_cudnn"  # torch's cuDNN attention, which returns the log-sum-exp ring attention merges by


def rank_backend(device: str) -> str:
    """How the ranks talk: NCCL between GPUs (one a rank), gloo between CPU ranks."""
    return "nccl" if device == "cuda" else "gloo"


def parallel_dtype(kind: str) -> torch.dtype:
    """The dtype the parallel models run in: fp64, but bf16 for ring (its backends run half precision only)."""
    return torch.bfloat16 if kind == "ring" else torch.float64


def parse_parallel(text: str, device: str, processor: str, model: str = models.DEFAULT_MODEL) -> tuple[str, int]:
    """`report --parallel KIND=N` of `model` -> (kind, N), or a VerifyError saying why it cannot run here."""
    kind, _, degree = text.partition("=")
    if kind not in KINDS or not degree.isdigit() or int(degree) < 2:
        raise VerifyError(f"--parallel {text}: expected tp=N, ulysses=N or ring=N with N >= 2")
    ranks = int(degree)
    require_plan(kind, model, f"--parallel {text}: ")
    if kind == "ring" and device != "cuda":
        raise VerifyError(f"--parallel {text}: ring attention needs an attention backend that returns the "
                          "log-sum-exp, which the CPU's native one does not; ring=N runs with --device cuda, tp=N and "
                          "ulysses=N on CPU ranks too")
    if device == "cuda" and torch.cuda.device_count() < ranks:
        raise VerifyError(f"--parallel {text}: needs {ranks} CUDA devices, this machine has "
                          f"{torch.cuda.device_count()}")
    shardable = ("reference", "fast") if model == models.DEFAULT_MODEL else ("reference",)  # 2.1 has one
    if processor not in shardable:
        raise VerifyError(f"--parallel {text}: shards the product's processors {' or '.join(shardable)} of {model} "
                          f"(pass one as --candidate), not {processor}")
    return kind, ranks


def require_plan(kind: str, model: str, context: str = "") -> None:
    """A VerifyError when `model`'s diffusers class has no plan for `kind` (context parallel needs its `_cp_plan`)."""
    arch = models.load(model)
    if kind != "tp" and getattr(arch.MODEL_CLASS, "_cp_plan", None) is None:
        raise VerifyError(f"{context}{model} has no context-parallel plan in diffusers ({arch.CLASS_NAME}._cp_plan "
                          "is absent), so ulysses=N and ring=N cannot shard it; tp=N shards it by its _tp_plan")


def require_even_split(text: str, kind: str, ranks: int, model: str, config: dict, seed: int) -> None:
    """A VerifyError when the ranks cannot share the work evenly: tensor and Ulysses parallelism give each rank the
    same number of whole heads; context parallelism (Ulysses, ring) splits each fixture's sequences in equal shards."""
    heads = config["num_attention_heads"]
    if kind != "ring" and heads % ranks:
        raise VerifyError(f"--parallel {text}: {kind} shares the model's {heads} attention heads among the ranks, "
                          f"and {ranks} ranks cannot share them evenly; pick a degree that divides {heads}")
    if kind == "tp":
        return
    lengths = {(name, k): inputs[k].shape[1] for name, (inputs, _) in _runs(models.load(model), config, seed).items()
               for k in SPLIT_SEQUENCES if k in inputs}
    uneven = [f"{name}'s {k} has {n} tokens" for (name, k), n in lengths.items() if n % ranks]
    if uneven:
        raise VerifyError(f"--parallel {text}: {kind} splits each sequence into {ranks} equal shards, and fixture "
                          f"{uneven[0]}; pick a degree that divides all of "
                          f"{', '.join(map(str, sorted(set(lengths.values()))))}")


def tp_plan(model: torch.nn.Module, plan: str) -> dict:
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


def check_parallel(kind: str = "tp", layout: str = "blocked", plan: str = "merged", ranks: int = 2,
                   processor: str = "reference", seed: int = 0, config: str = "tiny", device: str = "cpu",
                   backend: str | None = None, model: str = models.DEFAULT_MODEL) -> list[Record]:
    """One record per fixture of `model` (and per output of its cases of another path, see `_runs`): the merged model
    made parallel (`kind`) over `ranks` ranks by `plan` vs the unsharded standard model (fp64), relative to the
    standard model made parallel by its own plan, with the fused calls of every rank counted; every rank's outputs
    must agree. Ranks talk over `backend`: gloo on the CPU, NCCL on cuda (one GPU a rank; gloo puts several ranks on
    one GPU). (Spawns the ranks: a script calling it needs a __main__ guard.)"""
    import torch.multiprocessing as mp

    if plan not in PLANS.get(kind, ()):
        raise VerifyError(f"unknown {kind} plan {plan!r}; expected one of {', '.join(PLANS.get(kind, ()))}")
    require_plan(kind, model)
    backend = backend or rank_backend(device)
    with tempfile.TemporaryDirectory() as folder:
        init = Path(folder) / "init"
        mp.spawn(_rank, args=(ranks, str(init), folder, kind, layout, plan, processor, seed, config, device, backend,
                              model), nprocs=ranks, join=True)
        results = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(ranks)]
    records = []
    for name in results[0]:
        ref, base, cand = (results[0][name][k] for k in ("ref", "base", "cand"))
        record = compare(f"{kind}{ranks}/{plan}/{layout}/{name}", "model", {"sample": ref}, {"sample": cand}, OUTPUTS,
                         parallel_dtype(kind), device, base={"sample": base},
                         fused_calls=sum(r[name]["fused_calls"] for r in results))
        disagree = [r for r in range(1, ranks) if not torch.equal(results[r][name]["cand"], cand)]
        if disagree:
            record.passed, record.message = False, f"ranks {disagree} computed other outputs than rank 0"
        records.append(record)
    return records


def context_parallel(model: torch.nn.Module, ranks: int, rank: int, hand_to_processors: bool = True) -> None:
    """`model` made Ulysses context parallel over `ranks` CPU ranks in place, as enable_parallelism does on an
    accelerator; `hand_to_processors` False plants the bug of a processor that drops the parallel config."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    cp = ContextParallelConfig(ulysses_degree=ranks)
    config = ParallelConfig(context_parallel_config=cp)
    config.setup(rank, ranks, torch.device("cpu"), mesh=init_device_mesh("cpu", (1, ranks),
                                                                          mesh_dim_names=("ring", "ulysses")))
    model._parallel_config = config
    for module in model.modules():
        if hand_to_processors and hasattr(getattr(module, "processor", None), "_parallel_config"):
            module.processor._parallel_config = config
    apply_context_parallel(model, cp, model._cp_plan)


def diffusers_parallel(model: torch.nn.Module, kind: str, ranks: int, hand_to_processors: bool = True) -> None:
    """`model` made parallel in place by diffusers' own `enable_parallelism` (an accelerator's ranks); ring first
    takes an attention backend that returns the log-sum-exp. `hand_to_processors` False plants the bug of a
    processor that drops the parallel config."""
    from diffusers.models._modeling_parallel import ContextParallelConfig, TensorParallelConfig

    if kind == "ring":
        model.set_attention_backend(RING_BACKEND)
    model.enable_parallelism(config=TensorParallelConfig(tp_degree=ranks) if kind == "tp"
                             else ContextParallelConfig(**{f"{kind}_degree": ranks}))
    if not hand_to_processors:
        for module in model.modules():
            if getattr(getattr(module, "processor", None), "_parallel_config", None) is not None:
                module.processor._parallel_config = None


def _rank(rank: int, ranks: int, init: str, folder: str, kind: str, layout: str, plan: str, processor: str,
          seed: int, config_name: str, device: str, backend: str, model: str) -> None:
    """One rank: the unsharded standard model, then the standard and merged models made parallel, on every run of
    `_runs`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from verify.checks.runner import counting
    from verify.implementations.candidate import DEFAULT_FUSED_MODULES
    from verify.implementations.loading import fuse_any
    from verify.maths.naming import DEFAULT_NAMING

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    where = torch.device("cuda", rank % torch.cuda.device_count()) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(where)
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=ranks)
    try:
        arch = models.load(model)
        config = arch.model_config(config_name)
        dtype = parallel_dtype(kind)
        unsharded = arch.build_model(config, seed).to(where)
        std = torch.nn.Module.to(copy.deepcopy(unsharded), dtype)  # diffusers' .to warns of an empty fp32 list
        merged = fuse_any(copy.deepcopy(std), DEFAULT_NAMING, layout, processor)
        keeps_config = plan != "drops-parallel-config"
        if device == "cuda":
            if kind == "tp":
                merged._tp_plan = tp_plan(merged, plan)
            diffusers_parallel(std, kind, ranks)
            diffusers_parallel(merged, kind, ranks, hand_to_processors=keeps_config)
        elif kind == "tp":
            mesh = init_device_mesh("cpu", (ranks,))
            shard(std, std._tp_plan, mesh)
            shard(merged, tp_plan(merged, plan), mesh)
        else:
            context_parallel(std, ranks, rank)
            context_parallel(merged, ranks, rank, hand_to_processors=keeps_config)
        out = {}
        with torch.no_grad():
            for name, (inputs, outputs) in _runs(arch, config, seed).items():
                inputs = _on(inputs, where)
                cast = _on(inputs, where, dtype)
                with counting(merged, DEFAULT_FUSED_MODULES) as calls:
                    cand = outputs(merged, cast)
                ref, base = outputs(unsharded, inputs), outputs(std, cast)
                for key in cand:  # the forward's one output under the fixture's name; a case's each under its own
                    out[name if key == "sample" else f"{name}/{key}"] = {
                        "ref": ref[key].cpu(), "base": base[key].cpu(), "cand": cand[key].cpu(),
                        "fused_calls": calls()}
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _runs(arch, config: dict, seed: int) -> dict:
    """What every rank runs, name -> (fp64 CPU inputs, the outputs of a model on them): each fixture through the
    forward, then each whole-model case of `arch` that runs another path (Qwen-Image 2.1's KV-cached decode beside
    the full prefill), at the run's config (the ranks build one model: a case's config overrides are not applied)."""
    from verify.models.cases import model_outputs

    runs = {name: (arch.model_inputs(config, spec, seed), model_outputs) for name, spec in arch.FIXTURES.items()}
    return runs | {case.name: (case.inputs(config, case.spec, seed), case.outputs) for case in arch.CASES.values()
                   if case.component == "model" and case.outputs is not model_outputs}


def _on(inputs: dict, where: torch.device, dtype: torch.dtype | None = None) -> dict:
    """The model's inputs moved to `where`, their floating tensors cast to `dtype` (kept where None)."""
    return {k: v.to(where, dtype if dtype and v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
            for k, v in inputs.items()}
