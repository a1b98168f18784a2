"""Whether two LoRA files change a model by the same delta W (`qkv-verify lora-compare`).

Both files are planned onto the same standard model (verify.files.lora_mapping.plan: a fused q/k/v update is split into
its q, k and v parts exactly), each at its own file's scale convention, and every weight either file changes is
compared in fp64: ||dW_A - dW_B|| / ||dW_A|| (Frobenius norms) against torch.testing's default rtol for the least
precise dtype among the two files' A and B tensors (a converter that bakes the scale into B rounds B once, in that
dtype). A weight only one file changes has dW = 0 on the other side. The B/A ratio <dW_A, dW_B> / ||dW_A||^2 names a
pure scale error: 1/3 is a fused LoRA's scale computed from its stacked rank 3r.
"""

from __future__ import annotations

import re

import torch
from torch.testing._comparison import default_tolerances

from verify.checks.tolerance import dtype_name
from verify.files.lora_formats import LoraFile
from verify.files.lora_mapping import Plan, lora_layout


def tolerance(plans: list[Plan]) -> dict:
    """The rtol for the least precise dtype among the matched A and B tensors of `plans`, with its source."""
    dtypes = {t.dtype for plan in plans for p in plan.matched.values() for t in (p.A, p.B)}
    rtols = {d: default_tolerances(d)[0] for d in dtypes}
    worst = max(rtols, key=rtols.get)
    name = dtype_name(worst) if worst in (torch.float64, torch.float32, torch.bfloat16, torch.float16) else str(worst)
    return {"rtol": rtols[worst], "dtype": name,
            "rule": f"||dW_A - dW_B|| / ||dW_A|| <= {rtols[worst]:.3g}: torch.testing's default rtol for {name}, the "
                    "least precise dtype of the two files' A and B tensors"}


def compare(a: LoraFile, b: LoraFile, plan_a: Plan, plan_b: Plan) -> dict:
    """The comparison record: every weight either plan changes, its relative difference, B/A ratio and scales."""
    tol = tolerance([plan_a, plan_b])
    by_a, by_b = _by_target(plan_a), _by_target(plan_b)
    modules = []
    for target in sorted(by_a.keys() | by_b.keys(), key=_natural):
        ua, ub = by_a.get(target, []), by_b.get(target, [])
        da, db = _delta(ua), _delta(ub)
        na, nb = float(da.norm()), float(db.norm())
        diff = float((da - db).norm())
        relative = diff / na if na else (0.0 if diff == 0 else float("inf"))
        modules.append({
            "target": target, "relative": relative, "same": relative <= tol["rtol"],
            "ratio": float((da * db).sum()) / na**2 if na else None,
            "norm_a": na, "norm_b": nb,
            "scales_a": [u.factors.scale for u in ua], "scales_b": [u.factors.scale for u in ub],
            "sources_a": [s for u in ua for s in u.sources], "sources_b": [s for u in ub for s in u.sources],
        })
    different = [m for m in modules if not m["same"]]
    worst = max(modules, key=_badness) if modules else {"target": None, "relative": 0.0, "ratio": None}
    return {
        "same": not different,
        "tolerance": tol,
        "formats": {"a": a.format, "b": b.format},
        "layouts": {"a": lora_layout(a), "b": lora_layout(b)},
        "alpha_sources": {"a": a.alpha_source, "b": b.alpha_source},
        "modules_compared": len(modules),
        "modules_different": len(different),
        "only_a": [m["target"] for m in modules if not m["sources_b"]],
        "only_b": [m["target"] for m in modules if not m["sources_a"]],
        "unmatched_keys": {"a": plan_a.unmatched, "b": plan_b.unmatched},
        "worst": {"target": worst["target"], "relative": worst["relative"], "ratio": worst["ratio"]},
        "warnings": [*(f"A: {w}" for w in a.warnings), *(f"B: {w}" for w in b.warnings)],
        "modules": modules,
    }


def _badness(m: dict) -> tuple[bool, float]:
    return m["relative"] != m["relative"], m["relative"]  # NaN counts as the worst


def _by_target(plan: Plan) -> dict[str, list]:
    out: dict[str, list] = {}
    for u in plan.updates:
        out.setdefault(u.target, []).append(u)
    return out


def _delta(updates: list) -> torch.Tensor:
    """The summed m * (B @ A) of `updates` in fp64 (a scalar zero when there is none)."""
    total = torch.zeros((), dtype=torch.float64)
    for u in updates:
        total = total + u.factors.delta(torch.float64)
    return total


def _natural(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def table(record: dict) -> str:
    """The comparison as text: what was compared and the tolerance, modules grouped across blocks, the verdict."""
    files = record.get("files", {"a": "A", "b": "B"})
    lines = [f"A          {files['a']} ({record['formats']['a']}, {record['layouts']['a']} layout; scale: "
             f"{record['alpha_sources']['a']})",
             f"B          {files['b']} ({record['formats']['b']}, {record['layouts']['b']} layout; scale: "
             f"{record['alpha_sources']['b']})",
             f"tolerance  {record['tolerance']['rule']}",
             f"modules    {record['modules_compared']} weights compared in fp64, {record['modules_different']} "
             f"differ; {len(record['only_a'])} changed only by A, {len(record['only_b'])} only by B"]
    w = record["worst"]
    if w["target"] is not None:
        lines.append(f"worst      {w['target']}: {w['relative']:.3g}" + _ratio(w["ratio"]))
    groups: dict[str, list[dict]] = {}
    for m in record["modules"]:
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", m["target"]), []).append(m)
    width = max([len(k) for k in groups] + [6])
    lines += ["", f"{'module':<{width}}  count  max ||dW_A-dW_B||/||dW_A||  B/A ratio        scale A    scale B"]
    for pattern, ms in groups.items():
        rel = max(ms, key=_badness)["relative"]
        ratios = [m["ratio"] for m in ms if m["ratio"] is not None]
        low, high = (f"{min(ratios):.4g}", f"{max(ratios):.4g}") if ratios else ("-", "-")
        ratio = low if low == high else f"{low}..{high}"
        flag = "  DIFFERENT" if not all(m["same"] for m in ms) else ""
        lines.append(f"{pattern:<{width}}  {len(ms):>5}  {rel:>26.3g}  {ratio:<15}  {_scales(ms, 'scales_a'):<9}  "
                     f"{_scales(ms, 'scales_b'):<9}{flag}")
    lines += [f"only in A: {t}" for t in record["only_a"]] + [f"only in B: {t}" for t in record["only_b"]]
    for side in ("a", "b"):
        lines += [f"unmatched in {side.upper()} (changes nothing in this model): {k}"
                  for k in record["unmatched_keys"][side]]
    lines += [f"WARNING: {x}" for x in record["warnings"]]
    if record["same"]:
        lines.append(f"verdict: same delta W (every weight within rtol {record['tolerance']['rtol']:.3g})")
    else:
        lines.append(f"verdict: different: {record['modules_different']} of {record['modules_compared']} weights "
                     f"differ beyond rtol {record['tolerance']['rtol']:.3g}")
    return "\n".join(lines)


def _ratio(ratio: float | None) -> str:
    return "" if ratio is None else f" (B's delta = {ratio:.4g} x A's along A)"


def _scales(modules: list[dict], key: str) -> str:
    values = sorted({s for m in modules for s in m[key]})
    if not values:
        return "-"
    return ",".join(f"{v:.4g}" for v in values[:3]) + ("..." if len(values) > 3 else "")
