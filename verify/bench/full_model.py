"""The whole transformer's forward rows (--full-model): standard, lean-unfused, then fused in place."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Iterator

import torch
import torch._dynamo
from torch import nn

from verify.bench.blocks import block_flops, compile_block, forward_call, image_grid, rope_axes, set_recompile_limit
from verify.bench.floors import floors
from verify.bench.gate import sanity_check
from verify.bench.options import DTYPE, Options
from verify.bench.profiling import count_kernels
from verify.bench.table import format_row
from verify.bench.timing import sync, time_calls


def full_model_rows(opts: Options, peaks: tuple[float, float], t0: float, rows: list[dict], result: dict) -> None:
    """The whole transformer (opts.layers blocks) forward: standard, lean-unfused (its processors installed), then
    fused in place (one copy fits in memory); rows are appended to `rows` as they complete."""
    from verify.implementations.fused import fuse_model, unfuse_model
    from verify.implementations.lean_unfused import install

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
        install(model, opts.processor)
        for row, mode in zip(rows[-len(opts.modes):], opts.modes):
            run = _compile_blocks(model, opts) if mode == "compiled" else model
            with torch.no_grad():
                lean = run(**inputs).sample
            lean_ms = statistics.median(_timed_forward(run, inputs, repeats))
            row.update(lean_unfused_ms=lean_ms, lean_speedup=row["standard_ms"] / lean_ms,
                       kernels_lean_unfused=count_kernels(forward_call(run, inputs), opts.device, calls=1),
                       lean_check=sanity_check(f"full-model/{mode}/{tokens}/lean-unfused", (std_out[mode],), (lean,)))
            _uncompile_blocks(model)
        fuse_model(model, processor=opts.processor)  # replaces the lean processors
        for row, mode in zip(rows[-len(opts.modes):], opts.modes):
            run = _compile_blocks(model, opts) if mode == "compiled" else model
            with torch.no_grad():
                cand = run(**inputs).sample
            # Informational: bf16 differences of a correct processor can grow through many random-weight blocks;
            # the block's fp64-oracle check is the gate.
            check = sanity_check(f"full-model/{mode}/{tokens}", (std_out[mode],), (cand,))
            merged_ms = statistics.median(_timed_forward(run, inputs, repeats))
            row.update(merged_ms=merged_ms, speedup=row["standard_ms"] / merged_ms,
                       fusion_speedup=row["lean_unfused_ms"] / merged_ms,
                       kernels_merged=count_kernels(forward_call(run, inputs), opts.device, calls=1),
                       **floors(flops, peaks), merged_tflops=flops / (merged_ms * 1e-3) / 1e12,
                       check=check)
            _uncompile_blocks(model)
            opts.log(f"[{time.time() - t0:6.1f}s] full model {format_row(row)}")
            opts.on_update(result)
        unfuse_model(model)


def build_full_model(opts: Options) -> nn.Module:
    """The whole QwenImageTransformer2DModel at --dim/--heads/--head-dim with opts.layers blocks, seeded, built in
    bf16 directly on the device (about 41 GB at the real size; never fp32 or fp64 on the way)."""
    from verify.models.qwen_image import QwenImageTransformer2DModel, model_config
    from verify.models.seeded import randomise_norms

    config = model_config("full", num_layers=opts.layers, num_attention_heads=opts.heads,
                          attention_head_dim=opts.head_dim, axes_dims_rope=rope_axes(opts.head_dim))
    torch.manual_seed(opts.seed)
    with torch.device(opts.device), _default_dtype(DTYPE):
        model = QwenImageTransformer2DModel(**config)
    randomise_norms(model, opts.seed)
    return model.eval()


def full_model_inputs(opts: Options, image_tokens: int) -> dict:
    g = torch.Generator(device=opts.device).manual_seed(opts.seed + image_tokens)
    B = opts.batch
    return dict(
        hidden_states=torch.randn(B, image_tokens, 64, generator=g, device=opts.device, dtype=DTYPE),
        encoder_hidden_states=torch.randn(B, opts.text_tokens, 3584, generator=g, device=opts.device, dtype=DTYPE),
        encoder_hidden_states_mask=None,
        timestep=torch.full((B,), 0.5, device=opts.device, dtype=DTYPE),
        img_shapes=[[(1, *image_grid(image_tokens))]] * B,
    )


def full_model_flops(opts: Options, image_tokens: int) -> float:
    """Every block's matmul FLOPs plus the embeddings and the output projection (the time embedding is negligible)."""
    B, d = opts.batch, opts.dim
    edges = 2 * B * (image_tokens * 64 * d + opts.text_tokens * 3584 * d + image_tokens * d * 64)
    return opts.layers * block_flops(opts, image_tokens, "forward") + edges


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


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
