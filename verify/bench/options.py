"""What `qkv-verify bench` measures: its options, the modes, phases and arms of a row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch._dynamo

from verify.errors import VerifyError

DTYPE = torch.bfloat16

MODES = ("eager", "compiled")

PHASES = ("forward", "train")

LORA_PHASE = "lora-train"  # a LoRA training step: rows of --lora-rank

ALL_PHASES = (*PHASES, LORA_PHASE)

ARMS = ("standard", "merged", "lean_unfused")  # the implementations each block row times

# The merged processor when none is asked for, by model and device: Qwen-Image's fastest (on cuda its region compiled
# by inductor); Qwen-Image 2.1 has one, the reference.
DEFAULT_PROCESSORS = {"qwen-image": {"cuda": "fast-compiled", "cpu": "fast"},
                      "qwen-image-2.1": {"cuda": "reference", "cpu": "reference"}}

# Why a model's rows have no lean-unfused arm (verify.implementations.lean_unfused has Qwen-Image's processors only).
NO_LEAN_UNFUSED = {"qwen-image-2.1": "not measured: Qwen-Image 2.1's merged processor has no lean-unfused "
                                     "counterpart (verify.implementations.lean_unfused is Qwen-Image's)"}


@dataclass
class Options:
    """What to measure; every size comes from here, so a CPU smoke test runs the same code with tiny dims."""

    model: str = "qwen-image"  # of verify.models.MODELS
    device: str = "cuda"
    dim: int = 3072
    heads: int = 24
    head_dim: int = 128
    image_tokens: tuple[int, ...] = (4096, 8192, 16384)
    text_tokens: int = 256
    batch: int = 1
    modes: tuple[str, ...] = MODES
    phases: tuple[str, ...] = PHASES  # of ALL_PHASES; "lora-train" needs lora_rank
    processor: str = "fast"
    lora_rank: int = 0  # rank of the LoRA adapters of the lora-train rows (0: no such rows)
    repeats: int = 30  # timed calls per implementation and row
    warmup: int = 5
    seed: int = 0
    compile_backend: str = "auto"  # inductor on cuda; dynamo capture only ("eager") on the CPU
    compile_mode: str | None = None  # torch.compile mode for inductor (e.g. max-autotune-no-cudagraphs)
    compile_shapes: str = "dynamic"  # "dynamic": image sequence symbolic, one compile for all sizes; "static"
    full_model: bool = False
    layers: int = 60
    check_tokens: int | None = None  # a size judged before timing but not timed (every timed size is judged too)
    time_limit: float = 0.0  # seconds; past it, no new (mode, size) group starts (0: no limit)
    trace: Path | None = None  # folder for each row's profiler timelines (Chrome trace JSON), or none
    log: Callable[[str], None] = field(default=lambda line: print(line, flush=True), repr=False)
    on_update: Callable[[dict], None] = field(default=lambda result: None, repr=False)  # after every row

    def validate(self) -> None:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise VerifyError("--device cuda: no CUDA device on this machine (use --device cpu for a smoke test)")
        if self.dim != self.heads * self.head_dim:
            raise VerifyError(f"--dim {self.dim} is not --heads {self.heads} x --head-dim {self.head_dim}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise VerifyError(f"--head-dim must be even and at least 6 (three RoPE axes), got {self.head_dim}")
        if min(self.image_tokens, default=0) < 1 or self.text_tokens < 1 or self.batch < 1:
            raise VerifyError("--image-tokens, --text-tokens and --batch must be positive")
        if self.repeats < 1 or self.warmup < 1:
            raise VerifyError("--repeats and --warmup must be at least 1")
        if self.full_model:
            self._validate_full_model()
        if self.lora_rank < 0 or (LORA_PHASE in self.phases) != (self.lora_rank > 0):
            raise VerifyError(f"--lora-rank must be positive exactly when the {LORA_PHASE!r} rows are asked for, got "
                              f"rank {self.lora_rank} with phases {', '.join(self.phases)}")

    def _validate_full_model(self) -> None:
        """--full-model needs the model's whole-model bench (verify.models: bench_full_model), and image tokens in
        the multiples its inputs come in."""
        from verify.models import load

        model = load(self.model)
        if not hasattr(model, "bench_full_model"):
            raise VerifyError(f"--full-model: {self.model} has no whole-model bench (its block rows are timed "
                              "without --full-model)")
        step = model.BENCH_FULL_MODEL_TOKENS
        if any(tokens % step for tokens in self.image_tokens):
            raise VerifyError(f"--full-model: {self.model}'s image tokens come in multiples of {step}, got "
                              f"--image-tokens {','.join(map(str, self.image_tokens))}")

    @property
    def lean_unfused(self) -> bool:
        """Whether the rows time the lean-unfused arm (NO_LEAN_UNFUSED says why a model's do not)."""
        return self.model not in NO_LEAN_UNFUSED

    @property
    def backend(self) -> str:
        if self.compile_backend != "auto":
            return self.compile_backend
        return "inductor" if self.device == "cuda" else "eager"
