"""The comparison engine: candidate vs oracle (and the standard model's own error) -> one Record, never prints.

Vocabulary: `ref` the fp64 oracle, `base` the standard implementation in the tested dtype, `cand` the merged one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from verify.checks.tolerance import COARSER, DTYPES, EXACT, FLOORS, PRECISIONS, Rule, dtype_name, floor_dtype


@dataclass
class Record:
    """The outcome of one comparison, with the metrics of its worst tensor."""

    name: str
    component: str
    dtype: str
    device: str
    rule: str
    passed: bool
    message: str
    max_abs_err: float = math.nan  # |cand - ref| at the worst element (furthest beyond, or nearest to, its bound)
    base_max_abs_err: float | None = None  # max |base - ref| of that tensor
    rel_l2_err: float = math.nan
    cosine: float = math.nan
    mismatched: int = 0  # elements beyond their tensor's bound, over all tensors
    numel: int = 0
    worst_index: str = ""  # "tensor[i, j, ...]"
    ratio: float | None = None  # max_abs_err / base_max_abs_err; None when base is exact
    tolerance: float = 0.0  # the bound at the worst element
    bit_identical: bool = False  # cand equals base bit for bit (exact rule: equals the expected tensors)
    nonfinite: int = 0  # NaN/Inf elements in ref, base and cand
    fused_calls: int | None = None  # calls of fused projections during cand's run; None where no model ran
    first_divergence: str | None = None  # where a failing cand first leaves the bound (block, submodule); else None
    weight_gradients: str | None = None  # gradient records: "compared" or "not compared: <why>"
    provided: bool = True  # False: the implementation does not provide this component (never a pass)
    effective_precision: str | None = None  # the finest arithmetic (fp64, fp32, fp16, bf16) whose floor (relative
    # to the tensor's largest |ref|) explains |cand - ref| everywhere, or "coarser than bf16"; None: nothing compared

    @property
    def mismatched_fraction(self) -> float:
        return self.mismatched / self.numel if self.numel else 0.0

    def to_dict(self) -> dict:
        """JSON-ready: NaN and Inf become None (the record's `nonfinite` count says why)."""
        d = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
        d["mismatched_fraction"] = self.mismatched_fraction
        return d


@dataclass
class _TensorResult:
    name: str
    err: float  # max |cand - ref|
    base_err: float | None  # max |base - ref|
    bound: float  # allowed error at the worst element
    worst_err: float  # error at the worst element
    rel_l2: float
    cosine: float
    mismatched: int
    numel: int
    worst: str
    nonfinite: int
    identical: bool
    finest: int  # index into PRECISIONS of the finest arithmetic whose floor covers every element (len: none does)

    @property
    def badness(self) -> float:
        if self.nonfinite:
            return math.inf
        return self.worst_err / self.bound if self.bound else (math.inf if self.worst_err else 0.0)


def compare(
    name: str,
    component: str,
    ref: Mapping[str, torch.Tensor],
    cand: Mapping[str, torch.Tensor],
    rule: Rule,
    dtype: torch.dtype,
    device: str,
    base: Mapping[str, torch.Tensor] | None = None,
    fused_calls: int | None = None,
    precision: str | None = None,
    reference_precision: str | None = None,
) -> Record:
    """Judge `cand` against `ref` under `rule`; `base` (the standard model in `dtype`) sets the relative bound.
    `precision`, the finest arithmetic the candidate declares it computes at ('fp32'), and `reference_precision`, the
    finest the oracle reaches (diffusers' Qwen-Image 2.1 rounds to fp32 in fp64), set the floor of runs in finer
    dtypes."""
    judged_at = floor_dtype(dtype, precision, reference_precision)
    why = "declared" if floor_dtype(dtype, precision) == judged_at else "the reference's precision"
    described = rule.describe() + (f" at {dtype_name(judged_at)}'s floor ({why})" if judged_at != dtype else "")
    missing = sorted(set(ref) ^ set(cand) | (set(ref) ^ set(base) if base is not None else set()))
    if missing:
        return Record(name, component, dtype_name(dtype), str(device), described, False,
                      f"tensors present on one side only: {missing[:5]}", fused_calls=fused_calls)
    results = [_judge(key, ref[key], cand[key], None if base is None else base[key], rule, dtype, judged_at)
               for key in sorted(ref)]
    worst = max(results, key=lambda r: r.badness)
    mismatched = sum(r.mismatched for r in results)
    nonfinite = sum(r.nonfinite for r in results)
    passed = mismatched == 0 and nonfinite == 0
    effective = None if rule is EXACT else (PRECISIONS + (COARSER,))[max((r.finest for r in results), default=0)]
    message = _message(worst, mismatched, sum(r.numel for r in results), nonfinite, rule)
    if not passed and effective in PRECISIONS and effective != dtype_name(dtype):
        message = f"computes at {effective} precision: {message}"
    if fused_calls == 0:
        passed, message = False, "the fused projections never ran: this comparison exercised nothing"
    return Record(
        name=name, component=component, dtype=dtype_name(dtype), device=str(device), rule=described,
        passed=passed, message=message, max_abs_err=worst.err, base_max_abs_err=worst.base_err, rel_l2_err=worst.rel_l2,
        cosine=worst.cosine, mismatched=mismatched, numel=sum(r.numel for r in results), worst_index=worst.worst,
        ratio=(worst.err / worst.base_err) if worst.base_err else None, tolerance=worst.bound,
        bit_identical=all(r.identical for r in results), nonfinite=nonfinite, fused_calls=fused_calls,
        effective_precision=effective,
    )


def compare_exact(name: str, component: str, expected: Mapping[str, torch.Tensor],
                  actual: Mapping[str, torch.Tensor], device: str = "cpu") -> Record:
    """Bit-identity of two named tensor sets (weights, round trips); the message names the first differing tensor."""
    dtypes = {t.dtype for t in expected.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in FLOORS else torch.float64
    for key in sorted(set(expected) | set(actual)):
        problem = _exact_problem(key, expected.get(key), actual.get(key))
        if problem:
            return Record(name, component, dtype_name(dtype), str(device), EXACT.describe(), False,
                          f"first differing tensor: {problem}")
    return Record(name, component, dtype_name(dtype), str(device), EXACT.describe(), True,
                  f"{len(expected)} tensors bit-identical", max_abs_err=0.0, rel_l2_err=0.0, cosine=1.0,
                  numel=sum(t.numel() for t in expected.values()), bit_identical=True)


def _exact_problem(key: str, a: torch.Tensor | None, b: torch.Tensor | None) -> str | None:
    """None when a and b are the same bits; else what differs."""
    if a is None or b is None:
        return f"{key} missing from {'expected' if a is None else 'actual'}"
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{key}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    same = _bytes(a) == _bytes(b).to(a.device)  # compared where the tensors live: no copy of whole weights
    if bool(same.all()):
        return None
    diff = (a.double().cpu() - b.double().cpu()).abs() if a.is_floating_point() else None
    detail = f", max abs difference {float(diff.nan_to_num(math.inf).max()):.3g}" if diff is not None else ""
    return f"{key}: {int((~same).sum())} of {a.numel() * a.element_size()} bytes differ{detail}"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of `t` in logical order; works for 0-dim and non-contiguous (transposed, strided) tensors."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _judge(key: str, ref: torch.Tensor, cand: torch.Tensor, base: torch.Tensor | None, rule: Rule,
           dtype: torch.dtype, judged_at: torch.dtype) -> _TensorResult:
    r, c = ref.detach().double().cpu(), cand.detach().double().cpu()
    nonfinite = int((~torch.isfinite(c)).sum()) + int((~torch.isfinite(r)).sum())
    diff = (c - r).abs()
    base_err = None
    if base is not None:
        b = base.detach().double().cpu()
        nonfinite += int((~torch.isfinite(b)).sum())
        base_err = float((b - r).abs().max()) if b.numel() else 0.0
    r0 = r.nan_to_num(0.0, 0.0, 0.0)
    allowed = rule.bound(judged_at, base_err or 0.0, r0)
    excess = (diff - allowed).nan_to_num(math.inf)
    flat = int(excess.argmax()) if diff.numel() else 0  # the element furthest beyond (or nearest to) its bound
    worst = f"{key}[{', '.join(map(str, _unravel(flat, tuple(r.shape))))}]"
    ref_norm = float(r.norm())
    return _TensorResult(
        name=key, err=float(diff.nan_to_num(math.inf).max()) if diff.numel() else 0.0, base_err=base_err,
        bound=float(allowed.flatten()[flat]) if diff.numel() else 0.0,
        worst_err=float(diff.flatten()[flat]) if diff.numel() else 0.0,
        rel_l2=float((c - r).norm()) / ref_norm if ref_norm else float((c - r).norm()),
        cosine=float(torch.nn.functional.cosine_similarity(c.flatten(), r.flatten(), dim=0)) if c.numel() else 1.0,
        mismatched=int((excess > 0).sum()), numel=r.numel(), worst=worst,
        nonfinite=nonfinite, identical=base is not None and torch.equal(cand, base),
        finest=_finest(diff, rule, dtype, base_err or 0.0, r0) if not nonfinite else len(PRECISIONS),
    )


def _finest(diff: torch.Tensor, rule: Rule, dtype: torch.dtype, base_err: float, ref: torch.Tensor) -> int:
    """Index of the finest arithmetic, no finer than the run's dtype, whose floor under `rule` covers every element
    of `diff` (len(PRECISIONS): none does). The floor's relative part is taken of the tensor's largest |ref|: an
    arithmetic's rounding errors scale with the values summed, not with the one result (an element near zero)."""
    scale = ref.abs().max() if ref.numel() else ref.new_zeros(())
    start = PRECISIONS.index(dtype_name(dtype))
    for i, name in enumerate(PRECISIONS[start:], start):
        if bool((diff <= rule.bound(DTYPES[name], base_err, scale)).all()):
            return i
    return len(PRECISIONS)


def _unravel(flat: int, shape: tuple[int, ...]) -> list[int]:
    if 0 in shape:  # an empty tensor has no element to name (and `flat % 0` would raise)
        return []
    index = []
    for size in reversed(shape):
        index.append(flat % size)
        flat //= size
    return list(reversed(index))


def _message(worst: _TensorResult, mismatched: int, numel: int, nonfinite: int, rule: Rule) -> str:
    share = 100 * mismatched / numel if numel else 0.0
    text = (f"Mismatched elements: {mismatched} / {numel} ({share:.2g}%); greatest absolute difference "
            f"{worst.err:.3g}; worst element {worst.worst} off by {worst.worst_err:.3g} where "
            f"{worst.bound:.3g} is allowed by {rule.describe()}")
    text += f" (base error {worst.base_err:.3g})" if worst.base_err is not None else ""
    return text + (f"; {nonfinite} NaN/Inf elements" if nonfinite else "")


def assert_passed(record: Record) -> None:
    """pytest-style assertion on a record, with the diffusers-style message."""
    assert record.passed, f"{record.name} [{record.dtype}, {record.device}, {record.rule}]: {record.message}"


def assert_failed(record: Record) -> None:
    """The check must reject a planted bug."""
    assert not record.passed, f"{record.name} [{record.dtype}] passed a planted bug: {record.message}"
