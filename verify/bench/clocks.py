"""The GPU's SM clock and power while a region runs, sampled through NVML (nvidia-ml-py), so that a timing says at
what clock it was taken.

Under a sustained load an H200 sits at its 700 W power cap and its SM clock wanders between about 1400 and 1700 MHz
(max 1980); every kernel's time moves with it, by up to 9% between two runs of the same code a second apart
(reports/gpu/NOTES.md, change 13). A speed ratio is only meaningful where both sides saw the same clocks.
The clock and the reasons are read as they are at each sample; NVML's power reading on these cards is an average
over about a second, so `watts` lags a region shorter than that.
"""

from __future__ import annotations

import statistics
import threading

# NVML clock-event reason bits (nvmlClocksEventReason*), named as the reasons a clock was held below its maximum.
REASONS = {0x2: "applications_clocks", 0x4: "power_cap", 0x8: "hw_slowdown", 0x10: "sync_boost",
           0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "power_brake"}


class ClockSampler:
    """Samples (SM MHz, watts, reason bits) of one GPU every `interval` seconds on a thread, while in a `with`."""

    def __init__(self, nvml, handle, interval: float = 0.01):
        self.nvml, self.handle, self.interval = nvml, handle, interval
        self.samples: list[tuple[int, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClockSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        nvml, h = self.nvml, self.handle
        reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        while True:
            self.samples.append((nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
                                 nvml.nvmlDeviceGetPowerUsage(h) / 1e3, reasons(h)))
            if self._stop.wait(self.interval):
                return

    def summary(self) -> dict:
        limit = self.nvml.nvmlDeviceGetEnforcedPowerLimit(self.handle) / 1e3
        max_mhz = self.nvml.nvmlDeviceGetMaxClockInfo(self.handle, self.nvml.NVML_CLOCK_SM)
        return summarise(self.samples, limit, max_mhz)


def summarise(samples: list[tuple[int, float, int]], power_limit_w: float, max_sm_mhz: int) -> dict:
    """Mean, lowest and highest SM clock, mean power, and the share of samples held back by each reason."""
    clocks = [s[0] for s in samples]
    held = {name: sum(1 for s in samples if s[2] & bit) / len(samples) for bit, name in REASONS.items()}
    return dict(samples=len(samples), sm_mhz=statistics.mean(clocks), sm_mhz_min=min(clocks),
                sm_mhz_max=max(clocks), max_sm_mhz=max_sm_mhz, watts=statistics.mean(s[1] for s in samples),
                power_limit_w=power_limit_w, held_by={name: share for name, share in held.items() if share > 0})


class NoSampler:
    """Stands in where nothing can be sampled: summary() is None, `why` says why."""

    def __init__(self, why: str):
        self.why = why

    def __enter__(self) -> NoSampler:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def summary(self) -> None:
        return None


def sampler(device: str) -> ClockSampler | NoSampler:
    """A sampler of the current CUDA device; a NoSampler on the CPU or where nvidia-ml-py is not installed."""
    if device != "cuda":
        return NoSampler("no GPU clock on the CPU")
    try:
        import pynvml
    except ImportError:
        return NoSampler("nvidia-ml-py is not installed (pip install nvidia-ml-py)")
    import torch

    pynvml.nvmlInit()
    index = torch.cuda._get_nvml_device_index(torch.cuda.current_device())  # honours CUDA_VISIBLE_DEVICES
    return ClockSampler(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
