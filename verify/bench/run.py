"""`qkv-verify bench`: the speed of the merged-QKV block against diffusers' standard one, measured, never assumed.

One seeded transformer block of the model (Qwen-Image, or Qwen-Image 2.1: what the block, its inputs, FLOPs and LoRA
targets are comes from verify.models) in bf16 (or, with --full-model, its whole model), standard vs merged (the
chosen processor), forward and training step (forward + backward), eager and torch.compile. Qwen-Image's rows have a
third arm, *lean-unfused* (verify.implementations.lean_unfused; Qwen-Image 2.1's processor has no counterpart, and its
config.lean_unfused says so): the merged processor's own norm/RoPE/joint-layout arithmetic on the separate q/k/v
projections, so that a row splits its speedup into the lean arithmetic's share (`lean_speedup` = standard /
lean-unfused) and fusion's own (`fusion_speedup` = lean-unfused / merged). With --lora-rank R, `lora-train` rows time
the write-up's setting: PEFT LoRA adapters of rank R on the write-up's target lists, base weights frozen, a training
step into the adapters. Times are medians of many calls after a warm-up (CUDA events on a GPU, time.perf_counter on the
CPU), the arms interleaved call by call (every order in turn), with 95% confidence intervals of the paired speedups and
the GPU's clock and power while they ran (verify.bench.clocks); kernels per call come from torch.profiler (GPU kernels;
on the CPU, leaf aten ops that compute); achieved TFLOP/s and the matmul floor are against bf16 matmul peaks measured in
the same run (a short burst and sustained load). Before anything is timed, every arm (merged, lean-unfused, and their
LoRA counterparts) is judged at every size, eager and compiled, outputs and gradients, against an fp64 oracle by the
relative-to-base rule, with its projection calls counted in both modes (verify.bench.judge), so the bench never times a
wrong kernel."""

from __future__ import annotations

import statistics
import time

import torch
import torch._dynamo

from verify.bench import clocks
from verify.bench.blocks import (
    bench_model,
    block_flops,
    block_inputs,
    build_block,
    compile_block,
    forward_call,
    lean_block,
    mark_varying,
    merged_block,
    set_recompile_limit,
    train_call,
)
from verify.bench.floors import floors, matmul_peak_tflops, matmul_sustained_tflops
from verify.bench.full_model import full_model_rows
from verify.bench.gate import judge_arms, judged_arms, lean_check
from verify.bench.lora import lora_blocks, lora_check, lora_targets
from verify.bench.options import LORA_PHASE, NO_LEAN_UNFUSED, Options
from verify.bench.profiling import profile_kernels
from verify.bench.table import format_row
from verify.bench.timing import interleaved_times, speedup_interval


def run_bench(opts: Options) -> dict:
    """Every row of the block benchmark (and the full model's with opts.full_model) -> the JSON-ready result."""
    import diffusers

    opts.validate()
    t0 = time.time()
    log = opts.log
    result = dict(device=_device_name(opts.device), torch=torch.__version__, diffusers=diffusers.__version__,
                  matmul_peak_tflops=None, rows=[], checks=[], skipped=[], profiles=[], config=_config(opts))
    with clocks.sampler(opts.device) as sampled:
        peak = matmul_peak_tflops(opts.device)
    with clocks.sampler(opts.device) as held:
        sustained = matmul_sustained_tflops(opts.device, seconds=3.0 if opts.device == "cuda" else 0.1)
    result.update(matmul_peak_tflops=peak, matmul_peak_clocks=sampled.summary(), matmul_sustained_tflops=sustained,
                  matmul_sustained_clocks=held.summary())
    log(f"[{time.time() - t0:6.1f}s] {result['device']}: bf16 matmul peak {peak:.1f} TFLOP/s"
        f"{_clock_note(sampled, opts.device)}; sustained {sustained:.1f} TFLOP/s{_clock_note(held, opts.device)}")
    model = bench_model(opts)
    std = build_block(opts)
    blocks = {"standard": std, "merged": merged_block(std, opts.processor)}
    if opts.lean_unfused:
        blocks["lean_unfused"] = lean_block(std, opts.processor)
    lora = {}
    if LORA_PHASE in opts.phases:
        lora = lora_blocks(std, blocks["merged"], blocks.get("lean_unfused"), opts.lora_rank, opts.seed + 1,
                           model.BENCH_LORA_TARGETS)
    arms = {"": judged_arms(blocks, opts.processor, model.BENCH_OUTPUTS),
            "lora-": judged_arms(lora, opts.processor, model.BENCH_OUTPUTS)}
    runs = {"eager": (blocks, lora)}
    if "compiled" in opts.modes:
        set_recompile_limit(64)
        runs["compiled"] = ({arm: compile_block(m, opts, arm=arms[""].get(arm)) for arm, m in blocks.items()},
                            {arm: compile_block(m, opts, arm=arms["lora-"].get(arm)) for arm, m in lora.items()})
    extra = (opts.check_tokens,) if opts.check_tokens and opts.check_tokens not in opts.image_tokens else ()
    for mode in opts.modes:  # eager first: its rows are cheap; compilation happens in the compiled mode's warm-up
        run, lora_run = runs[mode]
        for i, tokens in enumerate((*extra, *opts.image_tokens)):
            if opts.time_limit and time.time() - t0 > opts.time_limit:
                result["skipped"].append(dict(mode=mode, image_tokens=tokens, reason="--time-limit"))
                log(f"[{time.time() - t0:6.1f}s] skipped {mode} at {tokens} image tokens (--time-limit)")
                continue
            inputs = block_inputs(opts, tokens)
            if mode == "compiled" and opts.compile_shapes == "dynamic":
                mark_varying(opts, inputs)
            checks = judge_arms(f"bench/{mode}/{tokens}+{opts.text_tokens}", std, arms[""], run, inputs, opts)
            if mode == "eager" and i == 0 and opts.lean_unfused:
                checks.append(lean_check("bench/lean-unfused", blocks["lean_unfused"], inputs))
            if lora_run:
                checks += judge_arms(f"bench/lora-{mode}/{tokens}+{opts.text_tokens}", lora["standard"], arms["lora-"],
                                     lora_run, inputs, opts, lora=True)
            if lora_run and i == 0:
                checks += [lora_check(f"bench/lora-{mode}/{arm}", arm, lora[arm], lora_run[arm],
                                      train_call(lora_run[arm], inputs, opts.seed, model.BENCH_OUTPUTS), inputs,
                                      model.BENCH_LORA_TARGETS) for arm in lora]
            result["checks"] += checks
            failed = [c for c in checks if not c["passed"]]
            if failed:
                raise BenchCheckFailed(result, failed)
            if tokens not in opts.image_tokens:
                continue
            for phase in opts.phases:
                arms_run = lora_run if phase == LORA_PHASE else run
                row = measure_row(opts, arms_run["standard"], arms_run["merged"], inputs, mode, phase, tokens,
                                  (peak, sustained), profile_sink=result["profiles"],
                                  lean_run=arms_run.get("lean_unfused"))
                result["rows"].append(row)
                log(f"[{time.time() - t0:6.1f}s] {format_row(row)}")
                opts.on_update(result)
            del inputs
            free_memory(opts.device)
    if opts.full_model:
        del std, blocks, lora, runs, run, lora_run, model
        free_memory(opts.device)
        result["full_model"] = []
        full_model_rows(opts, (peak, sustained), t0, result["full_model"], result)
    return result


def measure_row(opts: Options, std_run, merged_run, inputs: dict, mode: str, phase: str, tokens: int,
                peaks: tuple[float, float], flops: float | None = None, profile_sink: list | None = None,
                lean_run=None) -> dict:
    """One row: median times, kernels per call, floor and achieved TFLOP/s of the merged path; the profiles (time
    split into matmul / attention / other kernels, longest kernels) go to `profile_sink`. With `lean_run` (the
    lean-unfused arm) the three arms are interleaved call by call and the row splits the speedup: `lean_speedup`
    (standard / lean-unfused) times `fusion_speedup` (lean-unfused / merged), each with its paired 95% interval."""
    arms = {"standard": std_run, "merged": merged_run}
    if lean_run is not None:
        arms["lean_unfused"] = lean_run
    if phase == "forward":
        calls = {arm: forward_call(m, inputs) for arm, m in arms.items()}
    else:
        calls = {arm: train_call(m, inputs, opts.seed, bench_model(opts).BENCH_OUTPUTS) for arm, m in arms.items()}
    with clocks.sampler(opts.device) as sampled:
        times = dict(zip(calls, interleaved_times(list(calls.values()), opts)))
    ms = {arm: statistics.median(t) for arm, t in times.items()}
    ci = speedup_interval(times["standard"], times["merged"])
    flops = flops if flops is not None else block_flops(opts, tokens, phase)
    traces = {arm: opts.trace / f"{mode}-{phase}-{tokens}-{arm.replace('_', '-')}.json" if opts.trace else None
              for arm in calls}
    profiles = {arm: profile_kernels(fn, opts.device, trace=traces[arm]) for arm, fn in calls.items()}
    row = dict(mode=mode, phase=phase, image_tokens=tokens, text_tokens=opts.text_tokens, standard_ms=ms["standard"],
               merged_ms=ms["merged"], speedup=ms["standard"] / ms["merged"],
               kernels_standard=profiles["standard"]["kernels"], kernels_merged=profiles["merged"]["kernels"],
               **floors(flops, peaks), merged_tflops=flops / (ms["merged"] * 1e-3) / 1e12, speedup_ci=list(ci),
               clocks=sampled.summary(), standard_calls_ms=times["standard"], merged_calls_ms=times["merged"])
    if lean_run is not None:
        row.update(lean_unfused_ms=ms["lean_unfused"], fusion_speedup=ms["lean_unfused"] / ms["merged"],
                   fusion_speedup_ci=list(speedup_interval(times["lean_unfused"], times["merged"])),
                   lean_speedup=ms["standard"] / ms["lean_unfused"],
                   kernels_lean_unfused=profiles["lean_unfused"]["kernels"],
                   lean_unfused_calls_ms=times["lean_unfused"])
    if phase == LORA_PHASE:
        targets = bench_model(opts).BENCH_LORA_TARGETS
        row.update(lora_rank=opts.lora_rank, lora_targets={arm: list(lora_targets(arm, targets)) for arm in calls})
    if profile_sink is not None:
        profile_sink.append(dict(mode=mode, phase=phase, image_tokens=tokens, text_tokens=opts.text_tokens,
                                 **{name: p for name, p in profiles.items()}))
    return row


class BenchCheckFailed(Exception):
    """The merged block disagreed with the standard one: nothing was timed past this point."""

    def __init__(self, result: dict, failed: list[dict]):
        super().__init__("; ".join(f"{c['name']}: {c.get('message', c)}" for c in failed))
        self.result = result


def _clock_note(sampled, device: str) -> str:
    """' at SM ... MHz, ... W' for the log, or why no clock was sampled on a GPU."""
    summary = sampled.summary()
    if summary is not None:
        return f" at SM {summary['sm_mhz']:.0f} MHz, {summary['watts']:.0f} W"
    return f" (clocks not sampled: {sampled.why})" if device == "cuda" else ""


def _config(opts: Options) -> dict:
    return dict(model=opts.model, dim=opts.dim, heads=opts.heads, head_dim=opts.head_dim, batch=opts.batch,
                processor=opts.processor,
                repeats=opts.repeats, warmup=opts.warmup, compile_backend=opts.backend,
                compile_mode=opts.compile_mode, compile_shapes=opts.compile_shapes, seed=opts.seed,
                dtype="bf16", text_mask=None, layers=opts.layers if opts.full_model else None,
                lora_rank=opts.lora_rank or None, lora_dtype="bf16" if opts.lora_rank else None,
                lean_unfused=NO_LEAN_UNFUSED.get(opts.model, "timed"))


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

