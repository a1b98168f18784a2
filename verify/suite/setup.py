"""Test-session setup shared by the repository's suite and the packaged one: Hypothesis profiles and determinism.

Profiles: `dev` (default), `ci` (chosen when CI=true; derandomized, no deadline, no database), `thorough`, and
`find` (ci without shrinking: a verdict, not a minimal example); HYPOTHESIS_PROFILE overrides both.
"""

from __future__ import annotations

import os

import torch
from hypothesis import Phase, settings


def load_profile() -> str:
    """Register the profiles, load the one the environment asks for, and return its name."""
    settings.register_profile("dev", max_examples=20, deadline=None)
    settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, database=None,
                              print_blob=True)
    settings.register_profile("thorough", max_examples=1000, deadline=None)
    # ci without shrinking: where only the verdict counts (CI proving that each planted bug fails the suite)
    settings.register_profile("find", parent=settings.get_profile("ci"),
                              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    name = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if ci else "dev")
    settings.load_profile(name)
    return name


def deterministic() -> None:
    """Deterministic kernels, no TF32, one CPU thread: a result depends only on (seed, dtype, device)."""
    # cuBLAS needs this before its first use to be deterministic; harmless on the CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    # One CPU thread unless OMP_NUM_THREADS says otherwise: the models are tiny, a reduction's order then does not
    # depend on the machine, and on a busy 2-core runner two spinning OpenMP threads made the suite 5-8x slower.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
