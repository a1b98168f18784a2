"""Timing: calls timed in interleaved order (every arm sees the same clocks) and paired bootstrap intervals."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch._dynamo

from verify.bench.options import Options


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], device: str, calls: int) -> list[float]:
    """Milliseconds of each of `calls` calls of fn."""
    return time_each([fn] * calls, device)


def time_each(fns: list[Callable[[], object]], device: str) -> list[float]:
    """Milliseconds of each call, in order: CUDA events around each call on a GPU, perf_counter on the CPU."""
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in fns]
        for fn, (start, end) in zip(fns, events):
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for fn in fns:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def paired_times(a: Callable, b: Callable, opts: Options) -> tuple[list[float], list[float]]:
    """`opts.repeats` timed calls of a and of b after the warm-up, paired and alternating call by call (a b, b a,
    ...), so that clock and power drift hits both alike. Timing a block of one path's calls, then the other's, did
    not: under its power cap the GPU's clock moves between blocks (reports/gpu/NOTES.md, change 13)."""
    for fn in (a, b):
        for _ in range(opts.warmup):
            fn()
    sync(opts.device)
    order = [pair for i in range(opts.repeats) for pair in (((a, 0), (b, 1)) if i % 2 == 0 else ((b, 1), (a, 0)))]
    times = time_each([fn for fn, _ in order], opts.device)
    return ([t for (_, side), t in zip(order, times) if side == 0],
            [t for (_, side), t in zip(order, times) if side == 1])


def interleaved_times(fns: list[Callable], opts: Options) -> list[list[float]]:
    """`opts.repeats` timed calls of each of fns after the warm-up, interleaved call by call: repeat i runs every fn
    once, in the i-th of their orders (itertools.permutations, in turn), so that each fn takes each place equally
    often and the i-th calls of any two fns form a pair that shares its moment's clock. Two fns: exactly
    `paired_times` (a b, b a, ...)."""
    import itertools

    if len(fns) == 2:
        return list(paired_times(fns[0], fns[1], opts))
    for fn in fns:
        for _ in range(opts.warmup):
            fn()
    sync(opts.device)
    orders = list(itertools.permutations(range(len(fns))))
    order = [side for i in range(opts.repeats) for side in orders[i % len(orders)]]
    times = time_each([fns[side] for side in order], opts.device)
    return [[t for s, t in zip(order, times) if s == side] for side in range(len(fns))]


def speedup_interval(a_ms: list[float], b_ms: list[float], confidence: float = 0.95,
                     resamples: int = 4000) -> tuple[float, float]:
    """Confidence interval of median(a) / median(b) from paired calls: percentile bootstrap that resamples whole
    pairs (each pair shares its moment's clock), seeded so that a result reproduces."""
    pairs = torch.tensor([a_ms, b_ms], dtype=torch.float64)  # (2, n)
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(pairs.shape[1], (resamples, pairs.shape[1]), generator=g)
    medians = pairs[:, picks].quantile(0.5, dim=-1)  # (2, resamples); interpolated, as statistics.median
    ratios = medians[0] / medians[1]
    tail = (1 - confidence) / 2
    return ratios.quantile(tail).item(), ratios.quantile(1 - tail).item()
