"""Experiment: can inductor's kernel for the fast-compiled region (QK RMSNorm + RoPE + joint layout) get near memory
speed? It ran as a looped reduction at about 2.6x the time of the bytes it moves (NOTES, change 9).

Times the region alone (forward, and forward + backward) at real width for several ways of compiling it, next to a
plain copy of the same bytes, and names each variant's kernels with their time.

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

from verify import fast_fused
from verify.bench import time_calls

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
    region = fast_fused._joint_qkv_region
    yield "default", torch.compile(region, fullgraph=True)
    yield "static", torch.compile(region, fullgraph=True, dynamic=False)
    yield "coordinate-descent", torch.compile(region, fullgraph=True, dynamic=False,
                                              options={"coordinate_descent_tuning": True})
    yield "multi-kernel", torch.compile(region, fullgraph=True, dynamic=False, options={"triton.multi_kernel": 1})
    yield "max-autotune", torch.compile(region, fullgraph=True, dynamic=False, mode="max-autotune-no-cudagraphs")


def step(fn, args, grad: bool):
    if not grad:
        def run():
            with torch.no_grad():
                fn(*args)
        return run
    cotangents = None

    def run():
        nonlocal cotangents
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
    return sorted(([n, round(us, 1)] for n, us in out.items()), key=lambda t: -t[1])[:8]


def main(out: str) -> None:
    torch._dynamo.config.cache_size_limit = 64
    results = []
    for tokens in (8192, 16384):
        img_bytes = 2 * 2 * (TEXT + tokens) * DIM * 2  # q and k: read once, written once, bf16
        copy_src = torch.randn(2, TEXT + tokens, DIM, device="cuda", dtype=torch.bfloat16)
        ms = statistics.median(time_calls(lambda src=copy_src: src.clone(), "cuda", 50))
        results.append(dict(tokens=tokens, variant="copy of q and k", phase="forward", ms=ms,
                            gbps=img_bytes / ms / 1e6))
        print(results[-1], flush=True)
        for grad in (False, True):
            args = inputs(tokens, grad)
            for name, fn in variants():
                run = step(fn, args, grad)
                for _ in range(5):
                    run()
                torch.cuda.synchronize()
                ms = min(statistics.median(time_calls(run, "cuda", 30)) for _ in range(3))
                results.append(dict(tokens=tokens, variant=name, phase="train" if grad else "forward", ms=ms,
                                    kernels=kernels(run)))
                print(tokens, name, "train" if grad else "forward", round(ms, 4), results[-1]["kernels"][:3],
                      flush=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
