"""verify.bench.clocks: what a bench row records about the GPU's clock and power (summaries computed by hand here)."""

from __future__ import annotations

import pytest

from verify.bench import clocks


def test_summary_of_samples():
    """Mean/min/max clock and mean power, and each hold-back reason's share of samples (absent reasons omitted)."""
    samples = [(1500, 690.0, 0x4), (1700, 700.0, 0x4 | 0x20), (1600, 650.0, 0x0), (1400, 700.0, 0x4)]
    summary = clocks.summarise(samples, power_limit_w=700.0, max_sm_mhz=1980)
    assert summary == dict(samples=4, sm_mhz=1550, sm_mhz_min=1400, sm_mhz_max=1700, max_sm_mhz=1980,
                           watts=pytest.approx(685.0), power_limit_w=700.0,
                           held_by={"power_cap": 0.75, "sw_thermal": 0.25})


def test_no_clock_on_the_cpu():
    with clocks.sampler("cpu") as sampled:
        pass
    assert sampled.summary() is None and "CPU" in sampled.why


class _FakeNvml:
    """NVML's calls that the sampler makes, over a scripted clock (no GPU on CI)."""

    NVML_CLOCK_SM = 1

    def __init__(self):
        self.mhz = iter(range(1400, 2000, 10))

    def nvmlDeviceGetClockInfo(self, handle, kind):
        return next(self.mhz)

    def nvmlDeviceGetPowerUsage(self, handle):
        return 700_000  # milliwatts

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle):
        return 0x4

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetMaxClockInfo(self, handle, kind):
        return 1980


def test_sampler_samples_while_inside_and_stops():
    """At least one sample even for an instant region; none after the region ends."""
    with clocks.ClockSampler(_FakeNvml(), handle=None, interval=0.001) as sampled:
        pass
    count = len(sampled.samples)
    summary = sampled.summary()
    assert count >= 1 and summary["samples"] == count
    assert summary["sm_mhz_min"] == 1400 and summary["watts"] == 700.0 and summary["held_by"] == {"power_cap": 1.0}
    assert len(sampled.samples) == count
