"""Kernels per call and where the time goes (matmul, attention, other), from torch.profiler."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from verify.bench.timing import sync

# Leaf aten ops on the CPU that launch no computation (views, allocation, metadata): not counted as kernels.
_NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view", "aten::as_strided",
    "aten::reshape", "aten::_reshape_alias", "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::transpose",
    "aten::permute", "aten::expand", "aten::select", "aten::slice", "aten::narrow", "aten::split", "aten::chunk",
    "aten::unflatten", "aten::flatten", "aten::unbind", "aten::detach", "aten::alias", "aten::lift_fresh",
    "aten::resolve_conj", "aten::resolve_neg", "aten::view_as_real", "aten::view_as_complex", "aten::result_type",
    "aten::is_nonzero", "aten::item", "aten::_local_scalar_dense", "aten::split_with_sizes", "aten::contiguous",
    "aten::set_", "aten::resize_", "aten::to", "aten::_to_copy", "aten::type_as", "aten::zeros", "aten::ones",
}


def count_kernels(fn: Callable[[], object], device: str, calls: int = 2) -> int:
    """Kernels per call from torch.profiler: GPU kernels (memcpy/memset excluded); on the CPU, computing leaf ops."""
    return profile_kernels(fn, device, calls)["kernels"]


_ATTENTION = re.compile(r"flash|fmha|attention|sdpa", re.IGNORECASE)

_MATMUL = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|aten::(add)?mm\b|aten::bmm|addmm|_mm_|matmul", re.IGNORECASE)


def profile_kernels(fn: Callable[[], object], device: str, calls: int = 2, trace: Path | None = None) -> dict:
    """torch.profiler over `calls` calls (after one untimed call), per call: the kernel count, the time in matmul,
    attention and all other kernels (ms), and the kernels that took longest. GPU: device kernels (memcpy/memset
    timed as other, not counted); CPU: leaf aten ops that compute. `trace`: where to write the timeline too (the
    gaps between kernels, which the per-kind sums cannot show)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    if trace is not None:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    if device == "cuda":
        timed = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        counted = [e for e in timed if not e.name.startswith(("Memcpy", "Memset"))]
    else:
        timed = counted = [e for e in prof.events() if e.device_type == DeviceType.CPU and _cpu_kernel(e)]
    split = {"matmul_ms": 0.0, "attention_ms": 0.0, "other_ms": 0.0}
    by_name: dict[str, list] = {}
    for e in timed:
        us = e.time_range.elapsed_us() if device == "cuda" else e.self_cpu_time_total
        ms = us / 1e3 / calls
        kind = "attention_ms" if _ATTENTION.search(e.name) else "matmul_ms" if _MATMUL.search(e.name) else "other_ms"
        split[kind] += ms
        entry = by_name.setdefault(e.name[:120], [0.0, 0])
        entry[0] += ms
        entry[1] += 1
    top = sorted(([name, ms, n / calls] for name, (ms, n) in by_name.items()), key=lambda t: -t[1])[:12]
    return dict(kernels=round(len(counted) / calls), **split, top=top)


def _computes(e) -> bool:
    return e.name.startswith("aten::") and e.name not in _NO_KERNEL


def _cpu_kernel(e) -> bool:
    """A CPU aten op that stands for a kernel: a computing op with no computing op below it, or a matrix multiply
    (addmm's bias copy is a child, its BLAS call is its own)."""
    if not _computes(e):
        return False
    if _MATMUL.search(e.name):
        return True
    stack = list(e.cpu_children)
    while stack:
        child = stack.pop()
        if _computes(child):
            return False
        stack.extend(child.cpu_children)
    return True
