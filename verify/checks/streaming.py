"""Run a transformer one block at a time: weights of one block in memory, every implementation advanced.

The real model's fp64 oracle (about 160 GB of weights) fits no GPU and a 41 GB checkpoint must never sit whole in
RAM, so the report streams: the non-block modules once, then for each block its weights are read (or generated),
and the oracle, the standard model in each dtype and the merged model in each dtype each take one step. The model's
module in verify.models says what runs before the first block, in a block and after the last (stream_prologue,
stream_step, stream_epilogue: its forward line for line; a test holds them to it bit for bit).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from diffusers.models.normalization import RMSNorm
from torch import nn

from verify import models
from verify.checks.divergence import first_divergence, leaves_bound
from verify.checks.inputs import cast_inputs
from verify.checks.runner import counting, required
from verify.checks.tolerance import floor_dtype
from verify.files.checkpoint import Checkpoint
from verify.files.model_config import is_merged
from verify.implementations.candidate import Implementation, oracle_precision
from verify.implementations.loading import check_fits, empty_model, merged_naming
from verify.maths.state_dict import split_state_dict

BLOCKS = "transformer_blocks."
Weights = dict[str, torch.Tensor]
Update = Callable[[nn.Module, str], None]  # changes a module in place (a LoRA): (module, its path prefix)


class StateDictSource:
    """Weights from an in-memory state dict (the seeded tiny and small models, tests)."""

    def __init__(self, state: Weights, config: dict, fused: tuple[str, str] | None = None):
        self.state, self.config, self.fused = state, config, fused

    def top(self) -> Weights:
        return {k: v for k, v in self.state.items() if not k.startswith(BLOCKS)}

    def block(self, i: int) -> Weights:
        prefix = f"{BLOCKS}{i}."
        return {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}

    def standard_block(self, i: int) -> Weights:
        """Block i as standard weights: fused projections split back in the given (naming, layout)."""
        weights = self.block(i)
        if not self.fused:
            return weights
        naming, layout = self.fused
        return split_state_dict(weights, naming, layout, self.config["attention_head_dim"])


class CheckpointSource(StateDictSource):
    """Weights read lazily from a checkpoint, one block at a time; fused (naming detected, layout as told) or not."""

    def __init__(self, ckpt: Checkpoint, config: dict, layout: str = "blocked"):
        if is_merged(ckpt):
            super().__init__({}, config, (merged_naming(ckpt, config), layout))
        else:
            check_fits(ckpt, empty_model(config), config)
            super().__init__({}, config)
        self.ckpt = ckpt

    def top(self) -> Weights:
        return {k: self.ckpt.get(k) for k in self.ckpt.keys() if not k.startswith(BLOCKS)}

    def block(self, i: int) -> Weights:
        prefix = f"{BLOCKS}{i}."
        return {k[len(prefix):]: self.ckpt.get(k) for k in self.ckpt.keys() if k.startswith(prefix)}


class SeededSource(StateDictSource):
    """Deterministic weights generated per tensor from (seed, name) on `device`: the real width without a file.

    Linear weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), RMSNorm weights ~ U(0.5, 1.5) (so a norm swap shows).
    """

    def __init__(self, config: dict, seed: int, device: str, model: str = models.DEFAULT_MODEL):
        super().__init__({}, config)
        self.seed, self.device = seed, device
        self.shell = models.load(model).empty_model(config)  # the model's structure: the tensors' names and shapes

    def top(self) -> Weights:
        params = dict(self.shell.named_parameters())
        return {k: self._draw(k, p) for k, p in params.items() if not k.startswith(BLOCKS)}

    def block(self, i: int) -> Weights:
        prefix = f"{BLOCKS}{i}."
        block = self.shell.transformer_blocks[i]
        norms = {f"{n}.weight" for n, m in block.named_modules() if isinstance(m, RMSNorm)}
        return {k: self._draw(prefix + k, p, k in norms) for k, p in block.named_parameters()}

    def _draw(self, name: str, p: torch.Tensor, norm: bool = False) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        if norm:
            return torch.rand(p.shape, generator=g, device=self.device, dtype=torch.float64) + 0.5
        x = torch.randn(p.shape, generator=g, device=self.device, dtype=torch.float64)
        return x / p.shape[1] ** 0.5 if p.dim() == 2 else x * 0.02


@dataclass
class StreamRun:
    """Named outputs of the oracle, and of standard and merged per dtype; fused calls and where the candidate first
    left the bound (a block, and the submodule inside it when one can be named), per dtype."""

    ref: dict[str, torch.Tensor] = field(default_factory=dict)
    base: dict[torch.dtype, dict[str, torch.Tensor]] = field(default_factory=dict)
    cand: dict[torch.dtype, dict[str, torch.Tensor]] = field(default_factory=dict)
    fused_calls: dict[torch.dtype, int | None] = field(default_factory=dict)
    first_divergence: dict[torch.dtype, str | None] = field(default_factory=dict)


@dataclass
class _Impl:
    role: str  # "ref" | "base" | "cand"
    dtype: torch.dtype
    top: nn.Module = None
    state: dict = None
    block: nn.Module = None
    before: dict = None  # the state the current block started from
    fused_calls: list[int | None] = field(default_factory=list)  # per block (None: its implementation is unfused)


def run_streaming(std: StateDictSource, inputs: dict, dtypes: Iterable[torch.dtype], device: str,
                  candidate: Implementation, reference: Implementation, cand: StateDictSource | None = None,
                  std_update: Update | None = None, cand_update: Update | None = None,
                  model: str = models.DEFAULT_MODEL) -> StreamRun:
    """Oracle (the reference in fp64), standard (the reference) and candidate (each dtype) full-model outputs,
    streamed block by block; every block of each is built by its implementation from a standard block.

    `cand` is the user's merged weights (split back, in their layout, into the candidate's standard blocks).
    `std_update` changes a standard block in place before it is built (a LoRA in the standard layout); the
    candidate's blocks get `cand_update` after they are built when given (a LoRA in the merged layout), else
    `std_update` before.
    """
    config, arch = std.config, models.load(model)  # the model's module: its prologue, blocks, epilogue
    floor_precisions = (candidate.precision, oracle_precision(reference, arch.REFERENCE_PRECISION))
    impls = [_Impl("ref", torch.float64)]
    impls += [_Impl(role, d) for d in dtypes for role in ("base", "cand")]
    top_std, top_cand = _on(std.top(), device), _on((cand or std).top(), device)
    for impl in impls:
        impl.top = _top_module(arch, config, top_cand if impl.role == "cand" else top_std, impl.dtype, device)
        update = cand_update if impl.role == "cand" and cand_update else std_update
        if update:
            update(impl.top, "")
        impl.state = arch.stream_prologue(impl.top, config, cast_inputs(inputs, impl.dtype, device))
    run = StreamRun(first_divergence={d: None for d in dtypes})
    shared = {n for n, _ in arch.block_shell(config).named_modules() if n}
    for i in range(config["num_layers"]):
        w_std = _on(std.block(i), device)
        w_cand = _on(cand.standard_block(i), device) if cand else w_std
        for impl in impls:
            implementation = candidate if impl.role == "cand" else reference
            impl.block = _implementation_block(config, impl, w_cand if impl.role == "cand" else w_std, implementation,
                                               i, std_update, cand_update, arch)
            impl.before = impl.state
            with torch.no_grad(), counting(impl.block, implementation.fused_modules) as calls:
                impl.state = arch.stream_step(impl.block, impl.state)
            impl.fused_calls.append(calls())
        _locate(run, impls, i, shared, floor_precisions, arch)
        del w_std, w_cand
    for impl in impls:
        out = {"sample": arch.stream_epilogue(impl.top, config, impl.state)}
        if impl.role == "ref":
            run.ref = out
        elif impl.role == "base":
            run.base[impl.dtype] = out
        else:
            run.cand[impl.dtype] = out
            run.fused_calls[impl.dtype] = None if None in impl.fused_calls else sum(impl.fused_calls)
    return run


def streamed_model(arch, source: StateDictSource, implementation: Implementation, dtype: torch.dtype, device: str,
                   role: str) -> nn.Module:
    """The model's own class over `source`'s weights with every block built by `implementation`, each block's
    tensors held only while it runs: before each call they are read (or generated) again, in `dtype` on `device`,
    and built by the implementation the same way; after it they are released. The model's forward runs as it is,
    so a pipeline, a KV cache, the fused-call count and first divergence see an ordinary model whose largest
    resident part is one block (the sampled fp64 oracle of the real model, about 160 GB whole, on one card)."""
    config = source.config
    model = _top_module(arch, config, _on(source.top(), device), dtype, device)
    model.transformer_blocks = nn.ModuleList(_resident_block(arch, source, implementation, i, dtype, device, role)
                                             for i in range(config["num_layers"]))
    return model


def _resident_block(arch, source: StateDictSource, implementation: Implementation, i: int, dtype: torch.dtype,
                    device: str, role: str) -> nn.Module:
    """Block i as `implementation` builds it, its tensors empty between calls (filled by a fresh build before each)."""
    def build() -> nn.Module:
        block = _block(arch, source.config, _on(source.standard_block(i), device), dtype)
        return required(implementation, block, "block", role, "a streamed model builds one block at a time")

    block = build()
    _release(block)
    block.register_forward_pre_hook(lambda module, _args: _fill(module, build()))
    block.register_forward_hook(lambda module, _args, _out: _release(module))
    return block


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))


def _fill(block: nn.Module, fresh: nn.Module) -> None:
    """block's tensors take the data of the same-named tensors of `fresh`, a new build of the same block."""
    theirs = _tensors(fresh)
    for name, tensor in _tensors(block).items():
        tensor.data = theirs[name].data


def _release(block: nn.Module) -> None:
    for tensor in _tensors(block).values():
        tensor.data = tensor.data.new_empty(0)


def _implementation_block(config: dict, impl: _Impl, weights: Weights, implementation: Implementation, i: int,
                          std_update: Update | None, cand_update: Update | None, arch) -> nn.Module:
    """Block i of one implementation: a standard block with `weights` in impl's dtype, built by `implementation`."""
    prefix = f"{BLOCKS}{i}."
    block = _block(arch, config, weights, impl.dtype)
    after = cand_update if impl.role == "cand" else None
    if std_update and not after:
        std_update(block, prefix)
    built = required(implementation, block, "block", "candidate" if impl.role == "cand" else "reference",
                     "the full-model checks stream the model one block at a time")
    if after:
        after(built, prefix)
    return built


def _locate(run: StreamRun, impls: list[_Impl], i: int, shared: set[str], precisions: tuple[str | None, ...],
            arch) -> None:
    """After block i: for each dtype whose candidate has not diverged yet, check both streams against the bound
    and, where they leave it, name block i and its first diverging submodule (among the names in `shared`)."""
    ref = impls[0]
    for base, cand in zip(impls[1::2], impls[2::2]):
        if run.first_divergence[cand.dtype] is not None:
            continue
        floor = floor_dtype(cand.dtype, *precisions)
        if not any(leaves_bound(ref.state[k], base.state[k], cand.state[k], floor) for k in arch.STREAMS):
            continue
        before = {id(x.block): x.before for x in (ref, base, cand)}

        def forward(block: nn.Module, _dtype: torch.dtype, before: dict = before) -> None:
            arch.stream_step(block, before[id(block)])

        inner = first_divergence(ref.block, base.block, cand.block, forward, cand.dtype, shared, floor)
        run.first_divergence[cand.dtype] = f"{BLOCKS}{i}" + (f".{inner}" if inner else "")


def _on(weights: Weights, device: str) -> Weights:
    return {k: v.to(device=device, dtype=torch.float64) if v.is_floating_point() else v.to(device)
            for k, v in weights.items()}


def _top_module(arch, config: dict, weights: Weights, dtype: torch.dtype, device: str) -> nn.Module:
    """The model's non-block modules, with private copies of their weights (an update must never reach the source);
    the tables built at construction (buffers no checkpoint holds: Qwen-Image 2.1's timestep frequencies) cast to
    `dtype` as the whole model's are when it is cast."""
    top = arch.empty_model(config)
    top.transformer_blocks = nn.ModuleList()
    top.load_state_dict({k: v.to(dtype, copy=True) for k, v in weights.items()}, strict=True, assign=True)
    return nn.Module.to(top, device=device, dtype=dtype).eval()


def _block(arch, config: dict, weights: Weights, dtype: torch.dtype) -> nn.Module:
    """One standard block with private copies of its weights, in `dtype`."""
    block = arch.block_shell(config)
    block.load_state_dict({k: v.to(dtype, copy=True) for k, v in weights.items()}, strict=True, assign=True)
    return block.eval()
