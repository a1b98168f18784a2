"""Experiment: is the compiled training step's loss at 16384 image tokens in the code, or in how it is timed?

Times the compiled block's training step (standard vs merged, the bench's own builders) in three orders (standard
first in each round, merged first, and alternating call by call), samples the SM clock, power and clock-event
reasons through NVML meanwhile, and, from profiler timelines of several consecutive calls taken right after a
sustained run, the GPU's busy time (union of kernel intervals) against the wall span.

Usage (GPU machine, repository root): python3 reports/gpu/experiments/order_clocks.py OUT.json [TOKENS]
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time

import pynvml
import torch

from verify.bench import blocks as bench_blocks
from verify.bench import options as bench_options
from verify.bench import timing as bench_timing
from verify.models import qwen_image


class Sampler(threading.Thread):
    """NVML samples (time, SM MHz, watts, deg C, clock-event reason bits) every 10 ms until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.samples: list[tuple] = []
        self.stopped = threading.Event()

    def run(self):
        reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        while not self.stopped.wait(0.01):
            h = self.handle
            self.samples.append((time.perf_counter(), pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                                 pynvml.nvmlDeviceGetPowerUsage(h) / 1e3,
                                 pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU), reasons(h)))

    def between(self, t0: float, t1: float) -> dict:
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return {}
        bits = 0
        for s in inside:
            bits |= s[4]
        return dict(samples=len(inside), sm_mhz=statistics.mean(s[1] for s in inside),
                    sm_mhz_min=min(s[1] for s in inside), watts=statistics.mean(s[2] for s in inside),
                    temp_c=max(s[3] for s in inside), reason_bits=hex(bits))


def timed(fn, calls: int, sampler: Sampler) -> dict:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ms = bench_timing.time_calls(fn, "cuda", calls)
    t1 = time.perf_counter()
    return dict(median_ms=statistics.median(ms), first_ms=ms[0], last_ms=ms[-1], **sampler.between(t0, t1))


def interleaved(a, b, pairs: int) -> tuple[float, float]:
    """Medians of a and b timed call by call, a and b alternating (each call its own events)."""
    events = [[torch.cuda.Event(enable_timing=True) for _ in range(4)] for _ in range(pairs)]
    for e in events:
        e[0].record()
        a()
        e[1].record()
        e[2].record()
        b()
        e[3].record()
    torch.cuda.synchronize()
    return (statistics.median(e[0].elapsed_time(e[1]) for e in events),
            statistics.median(e[2].elapsed_time(e[3]) for e in events))


def busy(fn, calls: int) -> dict:
    """Profile `calls` consecutive calls: wall span of the kernels, their busy union, the largest idle gaps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    union, gaps, end = 0, [], spans[0][0]
    for s, e, name in spans:
        if s > end:
            gaps.append((s - end, name))
        union += max(0, e - max(s, end))
        end = max(end, e)
    total = end - spans[0][0]
    gaps.sort(reverse=True)
    return dict(span_ms=total / 1e3 / calls, busy_ms=union / 1e3 / calls, idle_ms=(total - union) / 1e3 / calls,
                gaps_over_50us=sum(1 for g in gaps if g[0] > 50) / calls,
                largest_gaps=[(round(g / 1e3, 3), n[:80]) for g, n in gaps[:6]])


def main(out: str, tokens: int) -> None:
    opts = bench_options.Options(device="cuda", image_tokens=(tokens,), processor="fast-compiled")
    bench_blocks.set_recompile_limit(64)
    std = bench_blocks.build_block(opts)
    merged = bench_blocks.merged_block(std, opts.processor)
    inputs = bench_blocks.block_inputs(opts, tokens)
    bench_blocks.mark_sequence(inputs["hidden_states"], inputs["image_rotary_emb"][0])
    outputs = qwen_image.BENCH_OUTPUTS
    a = bench_blocks.train_call(bench_blocks.compile_block(std, opts), inputs, opts.seed, outputs)
    b = bench_blocks.train_call(bench_blocks.compile_block(merged, opts), inputs, opts.seed, outputs)
    sampler = Sampler()
    sampler.start()
    for fn in (a, b, a, b):
        for _ in range(5):
            fn()
    torch.cuda.synchronize()
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, tokens=tokens, orders={})
    for order in ("std-first", "merged-first", "std-first", "merged-first"):
        rounds = []
        for _ in range(3):
            pair = (("std", a), ("merged", b)) if order == "std-first" else (("merged", b), ("std", a))
            rounds.append({name: timed(fn, 10, sampler) for name, fn in pair})
        speedups = [r["std"]["median_ms"] / r["merged"]["median_ms"] for r in rounds]
        result["orders"].setdefault(order, []).append(dict(speedups=speedups, rounds=rounds))
        print(order, [round(s, 3) for s in speedups], flush=True)
    std_ms, merged_ms = interleaved(a, b, 30)
    result["interleaved"] = dict(std_ms=std_ms, merged_ms=merged_ms, speedup=std_ms / merged_ms)
    print("interleaved", result["interleaved"], flush=True)
    for name, fn in (("std", a), ("merged", b), ("std", a), ("merged", b)):
        for _ in range(20):  # the sustained state the timing loop sees
            fn()
        result.setdefault("busy", []).append(dict(impl=name, **busy(fn, 5)))
        print(name, result["busy"][-1], flush=True)
    sampler.stopped.set()
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 16384)
