"""The timed block: seeded standard, merged and lean-unfused copies, their inputs, FLOPs, calls and compilation."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch._dynamo
from torch import nn

from verify.bench import judge as bench_judge
from verify.bench.options import DTYPE, LORA_PHASE, Options


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Three even RoPE axes summing to head_dim: (16, 56, 56) for the real 128, the same proportions otherwise."""
    first = 2 * max(1, round(head_dim / 16))
    rest = head_dim - first
    second = 2 * ((rest // 2) // 2)
    return first, second, rest - second


def image_grid(tokens: int) -> tuple[int, int]:
    """(height, width) in patches with height * width = tokens, as square as the factors allow."""
    height = max(h for h in range(1, math.isqrt(tokens) + 1) if tokens % h == 0)
    return height, tokens // height


def bench_model(opts: Options):
    """The module of the model benchmarked (verify.models): its block, inputs, FLOPs, outputs and LoRA targets."""
    from verify.models import load

    return load(opts.model)


def block_config(opts: Options) -> dict:
    """The model's full config at the bench's width (--heads x --head-dim, RoPE axes to match)."""
    return bench_model(opts).model_config("full", num_attention_heads=opts.heads, attention_head_dim=opts.head_dim,
                                          axes_dims_rope=rope_axes(opts.head_dim))


def build_block(opts: Options) -> nn.Module:
    """The model's standard diffusers block with seeded weights, built on the device and cast to bf16 (never fp64)."""
    return bench_model(opts).bench_block(block_config(opts), opts.seed, opts.device, DTYPE)


def merged_block(std: nn.Module, processor: str) -> nn.Module:
    """The merged block the bench times: a copy of `std` built by the candidate SPEC `processor` (tests judge this)."""
    from verify.checks.runner import build_component
    from verify.implementations.candidate import resolve

    return build_component(resolve(processor), copy.deepcopy(std), "block")


def lean_block(std: nn.Module, processor: str) -> nn.Module:
    """The lean-unfused block the bench times: a copy of `std` (its separate q/k/v projections kept) run by the
    lean-unfused counterpart of the merged `processor` (verify.implementations.lean_unfused; tests judge this)."""
    from verify.implementations.lean_unfused import lean_unfused

    return lean_unfused(processor)(copy.deepcopy(std), "block")


def block_inputs(opts: Options, image_tokens: int) -> dict:
    """Seeded bf16 inputs of one block at `image_tokens` (an image as square as its factors allow) and the text tokens
    (standard normal, never all zeros; no text padding: pipelines pass None)."""
    return bench_model(opts).bench_inputs(block_config(opts), image_grid(image_tokens), opts.text_tokens, opts.batch,
                                          opts.seed, opts.device, DTYPE)


def block_flops(opts: Options, image_tokens: int, phase: str) -> float:
    """FLOPs of one block's matrix multiplies (the model's: projections, MLP, modulation, the attention products).

    Training: backward of a linear layer is twice its forward (input and weight gradients); attention's backward is
    2.5 times its forward (scores recomputed, as torch.utils.flop_counter counts it). LoRA training (the merged
    arm's adapters): the frozen base layers' backward is their input gradient only (once their forward); each
    token passes one q/k/v adapter (d -> r -> 3d) and one output adapter (d -> r -> d) per stream it is in,
    forward and backward (input and weight gradients), 3 x 2 r (6 d) per token.
    """
    linear, attention = (opts.batch * f for f in bench_model(opts).bench_flops(block_config(opts), image_tokens,
                                                                               opts.text_tokens))
    if phase == LORA_PHASE:
        tokens = image_tokens + opts.text_tokens
        return 2 * linear + 3.5 * attention + opts.batch * 36 * tokens * opts.lora_rank * opts.dim
    return linear + attention if phase == "forward" else 3 * linear + 3.5 * attention


def forward_call(module: nn.Module, inputs: dict) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return module(**inputs)

    return run


def train_call(module: nn.Module, inputs: dict, seed: int, outputs: dict[str, str]) -> Callable[[], object]:
    """Forward + backward w.r.t. the input streams of `outputs` (the model's BENCH_OUTPUTS) and every weight, with
    fixed seeded cotangents; grads reset."""
    leaves = bench_judge.grad_leaves(inputs, outputs)
    args = {**inputs, **leaves}
    cotangents = bench_judge.cotangents(inputs, seed, outputs)

    def run():
        module.zero_grad(set_to_none=True)
        for t in leaves.values():
            t.grad = None
        outputs = module(**args)
        torch.autograd.backward(outputs, cotangents)

    return run


def compile_block(module, opts: Options, static: bool | None = None, arm: bench_judge.Arm | None = None):
    """torch.compile of the bench: static shapes, or (compile_shapes "dynamic") the image sequence marked dynamic;
    an `arm` keeps the graphs it compiles (to count its projection calls under compile)."""
    static = opts.compile_shapes == "static" if static is None else static
    if arm is not None:
        backend = arm.compiled(bench_judge.capturing(opts.backend, opts.compile_mode))
        return torch.compile(module, backend=backend, dynamic=False if static else None)
    mode = {"mode": opts.compile_mode} if opts.compile_mode and opts.backend == "inductor" else {}
    return torch.compile(module, backend=opts.backend, dynamic=False if static else None, **mode)


def mark_varying(opts: Options, inputs: dict) -> None:
    """Compile the image sequence length as a symbol in every input that grows with it (the model's)."""
    for tensor, dim in bench_model(opts).bench_sequence(inputs):
        torch._dynamo.maybe_mark_dynamic(tensor, dim)


def mark_sequence(hidden_states: torch.Tensor, image_freqs: torch.Tensor | None = None) -> None:
    """Compile the image sequence length as a symbol: one graph serves every --image-tokens size."""
    torch._dynamo.maybe_mark_dynamic(hidden_states, 1)
    if image_freqs is not None:
        torch._dynamo.maybe_mark_dynamic(image_freqs, 0)


def set_recompile_limit(n: int) -> None:
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(n, getattr(torch._dynamo.config, name)))
