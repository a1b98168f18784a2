"""The bf16 matmul peak of this device (a burst and sustained load) and a row's matmul floor."""

from __future__ import annotations

import statistics
import time

import torch
import torch._dynamo

from verify.bench.options import DTYPE
from verify.bench.timing import sync, time_calls


def matmul_peak_tflops(device: str) -> float:
    """Best bf16 matmul throughput over a few large shapes (median of each), measured now on this device."""
    shapes = [(8192, 8192, 8192), (16384, 3072, 12288), (8192, 12288, 3072)] if device == "cuda" else [(256, 256, 256)]
    best = 0.0
    for m, k, n in shapes:
        a, b = _matmul_operands(device, m, k, n)
        for _ in range(5):
            a @ b
        sync(device)
        ms = statistics.median(time_calls(lambda a=a, b=b: a @ b, device, 20))
        best = max(best, 2 * m * k * n / (ms * 1e-3) / 1e12)
        del a, b
    return best


def matmul_sustained_tflops(device: str, seconds: float) -> float:
    """bf16 matmul throughput the device holds under continuous load: the first peak shape run back to back for
    `seconds`, then timed. A GPU at its power cap runs below the clock of a short burst, and so does every block
    timed here (reports/gpu/NOTES.md, change 13); the burst peak is the conservative floor, this one the reachable."""
    m = k = n = 8192 if device == "cuda" else 256
    a, b = _matmul_operands(device, m, k, n)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ b
        sync(device)
    ms = statistics.median(time_calls(lambda: a @ b, device, 50))
    return 2 * m * k * n / (ms * 1e-3) / 1e12


def _matmul_operands(device: str, m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    return (torch.randn(m, k, generator=g, device=device, dtype=DTYPE),
            torch.randn(k, n, generator=g, device=device, dtype=DTYPE))


def floors(flops: float, peaks: tuple[float, float]) -> dict[str, float]:
    """The matmul floor in ms at the burst peak (`floor_ms`, the contract's) and at the sustained one."""
    burst, sustained = peaks
    return dict(floor_ms=flops / (burst * 1e12) * 1e3, floor_sustained_ms=flops / (sustained * 1e12) * 1e3)
