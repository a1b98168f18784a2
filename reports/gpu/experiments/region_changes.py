"""Experiment: what the fast-compiled region's changes 16-18 (reports/gpu/NOTES.md) cost at real width, in one run.

- "before": the region as benchmarked (bench-h200.json): norm and RoPE in fp32 throughout, coordinate-descent tuning,
  the sequence lengths marked dynamic (backed).
- "roundings": the half-precision norm rounded where diffusers rounds, kept by inductor's emulate_precision_casts.
- "now": that, called as the processor calls it: its own recompile budget and the norm weights' length not static
  (`call_region`), the sequence lengths marked dynamic (`mark_varying`).

Each is a step of forward + backward of the region alone (bf16, 24 heads of 128, 256 text tokens), timed interleaved
call by call (verify.bench.timing.interleaved_times), and its CUDA kernels summed under the profiler, which is the
measure where the CPU side of so short a call does not stay behind the GPU (region_variants.py).

Usage (GPU machine, repository root, on PYTHONPATH): python3 reports/gpu/experiments/region_changes.py OUT.json
"""

from __future__ import annotations

import json
import statistics
import sys
import types

import torch
from region_variants import HEAD_DIM, HEADS, TEXT, inputs  # the region's inputs at real width (sibling script)
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from properties.implementations.test_fast_fused import _rms_rope_fp32_throughout
from verify.bench.options import Options
from verify.bench.timing import interleaved_times
from verify.implementations import fast_fused


def _region_copy(rms_rope):
    """_joint_qkv_region as a function of its own (its own code object, so its own dynamo cache) calling `rms_rope`."""
    code = fast_fused._joint_qkv_region.__code__
    return types.FunctionType(code.replace(co_name=f"region_{rms_rope.__name__}"),
                              {**fast_fused.__dict__, "_rms_rope": rms_rope})


def _sequence_marked(fn):
    def call(txt, img, *rest):
        for t, dim in ((txt, 1), (img, 1), (rest[4], 0), (rest[5], 0)):
            torch._dynamo.maybe_mark_dynamic(t, dim)
        return fn(txt, img, *rest)
    return call


def _as_the_processor_calls(txt, img, *rest):
    fast_fused.mark_varying((txt, img), (rest[4], rest[5]))
    return fast_fused.call_region(fast_fused._compiled_region("inductor"), txt, img, *rest)


def variants() -> dict:
    tuned = {"coordinate_descent_tuning": True}
    return {
        "before": _sequence_marked(torch.compile(_region_copy(_rms_rope_fp32_throughout), fullgraph=True,
                                                 options=tuned)),
        "roundings": _sequence_marked(fast_fused.compile_region(_region_copy(fast_fused._rms_rope), "inductor")),
        "now": _as_the_processor_calls,
    }


def step(fn, args):
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    cotangents = []

    def run():
        for leaf in leaves:
            leaf.grad = None
        outs = fn(*args)
        if not cotangents:
            cotangents.extend(torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, cotangents)
    return run


def kernel_us(run) -> float:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA)


def main(out: str) -> None:
    results = []
    for tokens in (4096, 16384):
        args = inputs(tokens, grad=True)
        runs = {name: step(fn, args) for name, fn in variants().items()}
        for run in runs.values():
            run()  # compile
        times = interleaved_times(list(runs.values()), Options(device="cuda", repeats=40, warmup=5))
        kernels = {name: min(kernel_us(run) for _ in range(5)) for name, run in runs.items()}
        row = {"tokens": tokens, "text_tokens": TEXT, "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bf16",
               "phase": "forward+backward", "repeats": 40,
               "median_ms": {name: statistics.median(t) for name, t in zip(runs, times)},
               "kernel_us": kernels,
               "paired_ratio_median": {name: statistics.median(a / b for a, b in zip(t, times[0]))
                                       for name, t in zip(runs, times)}}
        results.append(row)
        print(json.dumps(row), flush=True)
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
