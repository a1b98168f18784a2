"""The whole transformer's forward rows (--full-model) of the model benchmarked: standard, lean-unfused (Qwen-Image
only: NO_LEAN_UNFUSED says why another model has none), then fused in place. What the model, its inputs and FLOPs are
comes from its module (verify.models: bench_full_model, bench_full_model_inputs, bench_full_model_flops)."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch._dynamo
from torch import nn

from verify.bench.blocks import bench_model, block_config, compile_block, forward_call, image_grid, set_recompile_limit
from verify.bench.floors import floors
from verify.bench.gate import sanity_check
from verify.bench.options import DTYPE, NO_LEAN_UNFUSED, Options
from verify.bench.profiling import count_kernels
from verify.bench.table import format_row
from verify.bench.timing import sync, time_calls

# What a row of a model without the lean-unfused arm holds for it: nothing measured
NO_LEAN_FIELDS = ("lean_unfused_ms", "lean_speedup", "kernels_lean_unfused", "lean_check")


def full_model_rows(opts: Options, peaks: tuple[float, float], t0: float, rows: list[dict], result: dict) -> None:
    """The whole transformer (opts.layers blocks) forward: standard, lean-unfused (its processors installed; a model
    without that arm gets None there and its reason in result["skipped"]), then fused in place (one copy fits in
    memory); rows are appended to `rows` as they complete."""
    from verify.implementations.loading import fuse_any, unfuse_any
    from verify.maths.naming import DEFAULT_NAMING

    model = build_full_model(opts)
    repeats = dataclasses.replace(opts, repeats=min(opts.repeats, 10), warmup=min(opts.warmup, 2))
    for tokens in opts.image_tokens:
        if opts.time_limit and time.time() - t0 > opts.time_limit:
            result["skipped"].append(dict(mode="full-model", image_tokens=tokens, reason="--time-limit"))
            continue
        inputs = full_model_inputs(opts, tokens)
        flops = full_model_flops(opts, tokens)
        std_out = {}
        for mode in opts.modes:
            run = _compile_blocks(model, opts) if mode == "compiled" else model
            with torch.no_grad():
                std_out[mode] = run(**inputs).sample
            std_ms = statistics.median(_timed_forward(run, inputs, repeats))
            kernels = count_kernels(forward_call(run, inputs), opts.device, calls=1)
            rows.append(dict(mode=mode, phase="forward", image_tokens=tokens, text_tokens=opts.text_tokens,
                             standard_ms=std_ms, kernels_standard=kernels, layers=opts.layers))
            _uncompile_blocks(model)
        if opts.lean_unfused:
            _lean_rows(model, opts, rows[-len(opts.modes):], std_out, inputs, tokens, repeats)
        else:
            result["skipped"].append(dict(mode="full-model", image_tokens=tokens, arm="lean_unfused",
                                          reason=NO_LEAN_UNFUSED[opts.model]))
            for row in rows[-len(opts.modes):]:
                row.update(dict.fromkeys(NO_LEAN_FIELDS))
        fuse_any(model, DEFAULT_NAMING, "blocked", opts.processor)  # replaces the lean processors
        for row, mode in zip(rows[-len(opts.modes):], opts.modes):
            run = _compile_blocks(model, opts) if mode == "compiled" else model
            with torch.no_grad():
                cand = run(**inputs).sample
            # Informational: bf16 differences of a correct processor can grow through many random-weight blocks;
            # the block's fp64-oracle check is the gate.
            check = sanity_check(f"full-model/{mode}/{tokens}", (std_out[mode],), (cand,))
            merged_ms = statistics.median(_timed_forward(run, inputs, repeats))
            lean_ms = row["lean_unfused_ms"]
            row.update(merged_ms=merged_ms, speedup=row["standard_ms"] / merged_ms,
                       fusion_speedup=None if lean_ms is None else lean_ms / merged_ms,
                       kernels_merged=count_kernels(forward_call(run, inputs), opts.device, calls=1),
                       **floors(flops, peaks), merged_tflops=flops / (merged_ms * 1e-3) / 1e12,
                       check=check)
            _uncompile_blocks(model)
            opts.log(f"[{time.time() - t0:6.1f}s] full model {format_row(row)}")
            opts.on_update(result)
        unfuse_any(model)


def _lean_rows(model: nn.Module, opts: Options, rows: list[dict], std_out: dict, inputs: dict, tokens: int,
               repeats: Options) -> None:
    """The lean-unfused arm of each mode's row: its processors installed on the standard model, timed and checked."""
    from verify.implementations.lean_unfused import install

    install(model, opts.processor)
    for row, mode in zip(rows, opts.modes):
        run = _compile_blocks(model, opts) if mode == "compiled" else model
        with torch.no_grad():
            lean = run(**inputs).sample
        lean_ms = statistics.median(_timed_forward(run, inputs, repeats))
        row.update(lean_unfused_ms=lean_ms, lean_speedup=row["standard_ms"] / lean_ms,
                   kernels_lean_unfused=count_kernels(forward_call(run, inputs), opts.device, calls=1),
                   lean_check=sanity_check(f"full-model/{mode}/{tokens}/lean-unfused", (std_out[mode],), (lean,)))
        _uncompile_blocks(model)


def full_model_config(opts: Options) -> dict:
    """The model's full config at the bench's width (block_config) with opts.layers blocks."""
    return bench_model(opts).model_config(block_config(opts), num_layers=opts.layers)


def build_full_model(opts: Options) -> nn.Module:
    """The model's whole transformer at --dim/--heads/--head-dim with opts.layers blocks, seeded, built in bf16
    directly on the device (its module's bench_full_model)."""
    return bench_model(opts).bench_full_model(full_model_config(opts), opts.seed, opts.device, DTYPE)


def full_model_inputs(opts: Options, image_tokens: int) -> dict:
    """Seeded bf16 inputs of the whole model at `image_tokens` (an image as square as its factors allow)."""
    return bench_model(opts).bench_full_model_inputs(full_model_config(opts), image_grid(image_tokens),
                                                     opts.text_tokens, opts.batch, opts.seed, opts.device, DTYPE)


def full_model_flops(opts: Options, image_tokens: int) -> float:
    """Every block's matmul FLOPs plus the embeddings and the output projection, for the batch."""
    return opts.batch * bench_model(opts).bench_full_model_flops(full_model_config(opts), image_tokens,
                                                                 opts.text_tokens)


def _timed_forward(run, inputs: dict, opts: Options) -> list[float]:
    call = forward_call(run, inputs)
    for _ in range(opts.warmup):
        call()
    sync(opts.device)
    return time_calls(call, opts.device, opts.repeats)


def _compile_blocks(model: nn.Module, opts: Options) -> nn.Module:
    """Regional compilation: each transformer block compiled (identical blocks share the compiled code)."""
    set_recompile_limit(max(64, 2 * opts.layers))
    for block in model.transformer_blocks:
        block._compiled_call_impl = compile_block(block._call_impl, opts, static=True)  # nn.Module.compile
    return model


def _uncompile_blocks(model: nn.Module) -> None:
    for block in model.transformer_blocks:
        block._compiled_call_impl = None
