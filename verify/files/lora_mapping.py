"""Matching LoRA pairs onto a model's Linear modules, standard or merged, and applying and removing them exactly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from verify.errors import VerifyError
from verify.files.lora_formats import LoraFile, Pair
from verify.maths import lora as algebra
from verify.maths import qkv
from verify.maths.naming import NAMINGS, streams

FUSED_LEAVES = {s.fused for pair in NAMINGS.values() for s in pair}


@dataclass(frozen=True)
class ModelSpec:
    """What matching needs of a model: the (out, in) shape of each Linear by module path, head size, q/k/v layout."""

    targets: dict[str, tuple[int, int]]
    head_dim: int
    layout: str = "blocked"

    @property
    def merged(self) -> bool:
        return any(leaf(p) in FUSED_LEAVES for p in self.targets)


@dataclass(frozen=True)
class Update:
    """One weight matrix's change: its module path and factors, and the file modules it comes from."""

    target: str
    factors: algebra.Factors
    sources: tuple[str, ...]


@dataclass
class Plan:
    """Where each LoRA pair of a file lands in a model, and the updates that result."""

    matched: dict[str, Pair]  # resolved module path -> pair, in the file's own layout
    unmatched: list[str]
    updates: list[Update]
    spec: ModelSpec

    @property
    def tensors(self) -> int:
        return sum(len(p.keys) for p in self.matched.values())


@dataclass(frozen=True)
class ModuleLoad:
    """One changed weight: ||delta W|| / ||W||, for a fused projection the q, k, v parts it touches, and its sources."""

    target: str
    relative_delta: float
    parts: tuple[str, ...] | None
    sources: tuple[str, ...]  # the file's modules (in its own layout) this change comes from


@dataclass
class LoadReport:
    """What a load did: LoRA modules matched, file tensors used, keys that matched nothing, weights changed."""

    modules_matched: int
    tensors_used: int
    unmatched_keys: list[str]
    modules: list[ModuleLoad] = field(default_factory=list)

    @property
    def weights_changed(self) -> int:
        return len({m.target for m in self.modules})


def leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def spec_of(model: nn.Module, layout: str | None = None) -> ModelSpec:
    """The ModelSpec of a diffusers Qwen-Image model (real or on the meta device).

    A merged model's fused processors know their q/k/v layout; it is used, and a different `layout` is refused
    (a LoRA loaded in the wrong layout lands on the wrong rows without any error).
    """
    found = {p.layout for p in model.attn_processors.values() if hasattr(p, "layout")}
    if len(found) > 1 or (found and layout not in (None, *found)):
        raise VerifyError(f"the model's fused projections use layout {', '.join(sorted(found))}, not {layout}")
    targets = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return ModelSpec(targets, model.config.attention_head_dim, layout or next(iter(found), "blocked"))


def lora_layout(lora: LoraFile) -> str:
    """'merged' if any pair of the file targets a fused q/k/v projection, else 'standard'."""
    fused = any(leaf(p.path) in FUSED_LEAVES or p.flat and p.path.endswith(tuple(FUSED_LEAVES)) for p in lora.pairs)
    return "merged" if fused else "standard"


def plan(lora: LoraFile, spec: ModelSpec, multiplier: float | None = None) -> Plan:
    """Match every pair onto `spec`, converting between separate and fused q/k/v where the layouts differ.

    Each pair's scale follows the file's convention, or is `multiplier` for every pair (DiffSynth's loader).
    VerifyError if no pair matches or a matched pair's shape is not its target's.
    """
    others = _other_layout(spec)
    flat: dict[str, set[str]] = {}
    for p in [*spec.targets, *others]:
        flat.setdefault(p.replace(".", "_"), set()).add(p)
    matched, unmatched = {}, []
    for pair in lora.pairs:
        path = _unflatten(pair.path, flat) if pair.flat else pair.path
        if path in matched:
            raise VerifyError(f"two modules of the file target {path}: {matched[path].keys[0]!r}, {pair.keys[0]!r}")
        if path in spec.targets or path in others:
            _check_shape(pair, path, spec.targets[path] if path in spec.targets else others[path].shape)
            matched[path] = pair
        else:
            unmatched.append(pair.keys[0].split(".", 1)[0] if pair.flat else pair.path)  # kohya: as the file has it
    if not matched:
        raise VerifyError(
            f"no LoRA module matched the model: {len(unmatched)} modules in the file, e.g. {unmatched[0]!r}"
        )
    scales = {p: multiplier if multiplier is not None else algebra.multiplier(x.alpha, x.rank, x.rslora)
              for p, x in matched.items()}
    factors = {p: algebra.Factors(x.A, x.B, scales[p]) for p, x in matched.items()}
    return Plan(matched, sorted(unmatched), _updates(factors, spec, others), spec)


@dataclass(frozen=True)
class Alternative:
    """A path the model holds in its other layout: a fused one on a standard model, a separate one on a merged one."""

    fused: str  # the fused projection's path
    separate: tuple[str, str, str]  # the q, k, v projections' paths
    shape: tuple[int, int]  # (out, in) of this path


def _other_layout(spec: ModelSpec) -> dict[str, Alternative]:
    """Paths a LoRA may name that the model holds differently: fused or separate, or fused in the other naming."""
    out = {}
    all_streams = {s for pair in NAMINGS.values() for s in pair}
    for stream in all_streams:
        for path, (rows, cols) in spec.targets.items():
            prefix = path[: -len(leaf(path))]
            fused, separate = prefix + stream.fused, tuple(prefix + n for n in stream.separate)
            if leaf(path) == stream.q and all(p in spec.targets for p in separate):
                out[fused] = Alternative(fused, separate, (sum(spec.targets[p][0] for p in separate), cols))
            if leaf(path) == stream.fused:
                out.update({p: Alternative(fused, separate, (rows // 3, cols)) for p in separate})
                renamed = {prefix + s.fused for s in all_streams if s.q == stream.q and s.fused != stream.fused}
                out.update({p: Alternative(fused, separate, (rows, cols)) for p in renamed})
    return out


def other_layout(spec: ModelSpec) -> dict[str, Alternative]:
    """The paths `spec` holds in its other layout (fused ones of a standard model, separate ones of a merged one)."""
    return _other_layout(spec)


def _unflatten(name: str, flat: dict[str, set[str]]) -> str | None:
    """The model path whose dots-as-underscores spelling is `name` (kohya); VerifyError if several are."""
    found = flat.get(name, set())
    if len(found) > 1:
        raise VerifyError(f"kohya name {name!r} fits several modules: {', '.join(sorted(found))}")
    return next(iter(found), None)


class ShapeMismatch(VerifyError):
    """A LoRA module whose weight shape is not its target's: most often a LoRA made for another model size."""


def _check_shape(pair: Pair, path: str, shape: tuple[int, int]) -> None:
    if (pair.B.shape[0], pair.A.shape[1]) != shape:
        raise ShapeMismatch(
            f"LoRA module {pair.path!r} updates a ({pair.B.shape[0]}, {pair.A.shape[1]}) weight, "
            f"but the model's {path} is {shape}: a LoRA for another model size?"
        )


def _updates(factors: dict[str, algebra.Factors], spec: ModelSpec, others: dict[str, Alternative]) -> list[Update]:
    updates, to_fuse = [], {}
    for path, f in factors.items():
        alt = others.get(path)
        if alt is None:
            updates.append(Update(path, f, (path,)))
        elif path == alt.fused:  # a fused LoRA on a standard model: one update per q, k, v
            parts = algebra.split(f, fused_shape(spec, alt.shape[0]), spec.layout)
            updates += [Update(p, part, (path,)) for p, part in zip(alt.separate, parts) if part is not None]
        elif leaf(path) in FUSED_LEAVES:  # the fused projection under the other naming's name
            updates.append(Update(alt.fused, f, (path,)))
        else:
            to_fuse.setdefault(alt, {})[path] = f
    for alt, found in to_fuse.items():
        shape = fused_shape(spec, spec.targets[alt.fused][0])
        parts = [found.get(p) for p in alt.separate]
        fused = algebra.fuse(parts, (shape.q_rows, shape.k_rows, shape.v_rows), spec.layout, spec.head_dim)
        updates.append(Update(alt.fused, fused, tuple(found)))
    return updates


def fused_shape(spec: ModelSpec, rows: int) -> qkv.QKVShape:
    return qkv.QKVShape.equal(rows, spec.head_dim)


@torch.no_grad()
def apply(model: nn.Module, plan: Plan) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """W += m * (B @ A) for every update, in place; returns the load report and the original weights for remove."""
    modules = dict(model.named_modules())
    saved: dict[str, torch.Tensor] = {}
    report = LoadReport(len(plan.matched), plan.tensors, list(plan.unmatched))
    for u in plan.updates:
        W = modules[u.target].weight
        saved.setdefault(u.target, W.detach().clone())
        delta = u.factors.delta(torch.promote_types(W.dtype, torch.float32))
        parts = None
        if leaf(u.target) in FUSED_LEAVES:
            parts = algebra.touched(delta, fused_shape(plan.spec, W.shape[0]), plan.spec.layout)
        relative = float(delta.norm() / saved[u.target].double().norm())
        report.modules.append(ModuleLoad(u.target, relative, parts, u.sources))
        W += delta.to(W.dtype)
    return report, saved


@torch.no_grad()
def remove(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Undo apply exactly: copy the saved original weights back (no subtraction, so no rounding)."""
    modules = dict(model.named_modules())
    for path, W in saved.items():
        modules[path].weight.copy_(W)


def retarget(spec: ModelSpec, to: str, naming: str = "seed") -> ModelSpec:
    """The same model's spec in layout `to`: 'standard', or 'merged' with the fused names of `naming`."""
    separate = {p: a.shape for p, a in _other_layout(spec).items() if p != a.fused}
    standard = ModelSpec({**{p: s for p, s in spec.targets.items() if leaf(p) not in FUSED_LEAVES}, **separate},
                         spec.head_dim, spec.layout)
    if to == "standard":
        return standard
    names = {s.fused for s in streams(naming)}
    fused = {p: a for p, a in _other_layout(standard).items() if p == a.fused and leaf(p) in names}
    drop = {p for a in fused.values() for p in a.separate}
    targets = {p: s for p, s in standard.targets.items() if p not in drop}
    return ModelSpec({**targets, **{p: a.shape for p, a in fused.items()}}, spec.head_dim, spec.layout)
