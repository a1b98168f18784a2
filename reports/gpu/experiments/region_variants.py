"""Experiment: can inductor's kernel for the fast-compiled region (QK RMSNorm + RoPE + joint layout) get near memory
speed? It ran as a looped reduction at about 2.6x the time of the bytes it moves (NOTES, change 9).

Times the region alone (forward, and forward + backward) at real width for several ways of compiling it, next to a
plain copy of the same bytes, and names each variant's kernels with their time. The kernel sum is the measure: the
region alone is too short for its CPU side (autograd, guards) to stay behind the GPU, as it does in the block.

Usage (GPU machine, repository root): python3 reports/gpu/experiments/region_variants.py OUT.json
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
import torch._dynamo
import torch._inductor.config
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from verify.bench.timing import time_calls
from verify.implementations import fast_fused

DIM, HEADS, HEAD_DIM, TEXT = 3072, 24, 128, 256


def inputs(tokens: int, grad: bool) -> tuple:
    g = torch.Generator(device="cuda").manual_seed(tokens)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(shape, generator=g, device="cuda", dtype=dtype).requires_grad_(grad)

    def freqs(s):
        angles = torch.rand(s, HEAD_DIM // 2, generator=g, device="cuda") * 6.28
        return torch.view_as_real(torch.polar(torch.ones_like(angles), angles))

    weights = [(1 + 0.1 * randn(HEAD_DIM).detach()).requires_grad_(grad) for _ in range(4)]
    return (randn(1, TEXT, 3 * DIM), randn(1, tokens, 3 * DIM), *weights, freqs(TEXT), freqs(tokens),
            (1e-6,) * 4, HEAD_DIM, "blocked")


def variants():
    """(name, compiled region, whether the sequence lengths are marked dynamic before each call)."""
    region = fast_fused._joint_qkv_region
    no_cat = {"max_pointwise_cat_inputs": 1}  # cat/stack as one kernel per input writing its slice
    tuned = {"coordinate_descent_tuning": True}
    yield "default", torch.compile(region, fullgraph=True), False
    yield "coordinate-descent", torch.compile(region, fullgraph=True, options=tuned), False
    yield "no-pointwise-cat", torch.compile(region, fullgraph=True, options=no_cat), False
    yield "sequence-dynamic", torch.compile(region, fullgraph=True), True
    yield "sequence-dynamic+cd (the processor's)", fast_fused._compiled_region("inductor"), True


def marking(fn):
    """fn with the sequence dimensions of its inputs marked dynamic first, as the processor marks them."""
    def call(txt, img, *rest):
        for t, dim in ((txt, 1), (img, 1), (rest[4], 0), (rest[5], 0)):
            torch._dynamo.maybe_mark_dynamic(t, dim)
        return fn(txt, img, *rest)
    return call


def step(fn, args, grad: bool):
    if not grad:
        def run():
            with torch.no_grad():
                fn(*args)
        return run
    cotangents = None

    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def run():
        nonlocal cotangents
        for leaf in leaves:
            leaf.grad = None
        outs = fn(*args)
        if cotangents is None:
            cotangents = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, cotangents)
    return run


def kernels(run) -> list:
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    out = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            out[e.name[:90]] = out.get(e.name[:90], 0) + e.time_range.elapsed_us()
    return round(sum(out.values()), 1), sorted(([n, round(us, 1)] for n, us in out.items()), key=lambda t: -t[1])


def main(out: str) -> None:
    torch._dynamo.config.cache_size_limit = 64
    results = []
    for tokens in (4096, 8192):
        img_bytes = 2 * 2 * (TEXT + tokens) * DIM * 2  # q and k: read once, written once, bf16
        copy_src = torch.randn(2, TEXT + tokens, DIM, device="cuda", dtype=torch.bfloat16)
        ms = statistics.median(time_calls(lambda src=copy_src: src.clone(), "cuda", 50))
        results.append(dict(tokens=tokens, variant="copy of q and k", phase="forward", ms=ms,
                            gbps=img_bytes / ms / 1e6))
        print(results[-1], flush=True)
        for grad in (False, True):
            args = inputs(tokens, grad)
            for name, fn, marked in variants():
                run = step(marking(fn) if marked else fn, args, grad)
                for _ in range(5):
                    run()
                torch.cuda.synchronize()
                ms = min(statistics.median(time_calls(run, "cuda", 30)) for _ in range(3))
                kernel_us, listed = kernels(run)
                results.append(dict(tokens=tokens, variant=name, phase="train" if grad else "forward", ms=ms,
                                    kernel_us=kernel_us, kernels=listed))
                print(tokens, name, "train" if grad else "forward", f"{ms:.4f} ms, kernels {kernel_us} us",
                      listed[:4], flush=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
