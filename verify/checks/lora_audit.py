"""The audit record of a LoRA file against a model: what lands where, at which scale, with what capacity and risks."""

from __future__ import annotations

import math
import re

import torch

from verify.files.lora_formats import NO_ALPHA, LoraFile
from verify.files.lora_mapping import Plan, leaf, lora_layout
from verify.maths import lora as algebra
from verify.maths import qkv
from verify.maths.naming import NAMINGS

# leaf name -> (stream, part); part None for a fused projection
_QKV = {getattr(s, p): (s.name, p) for pair in NAMINGS.values() for s in pair for p in algebra.PARTS}
_QKV.update({s.fused: (s.name, None) for pair in NAMINGS.values() for s in pair})
LOW_PRECISION = (torch.bfloat16, torch.float16)


def audit(lora: LoraFile, plan: Plan) -> dict:
    """The record `lora-audit` prints and writes as JSON (plan built with the file's own scale convention)."""
    pairs = plan.matched
    scales = {path: algebra.multiplier(p.alpha, p.rank, p.rslora) for path, p in pairs.items()}
    low, high = min(scales.values()), max(scales.values())
    return {
        "format": lora.format,
        "layout": lora_layout(lora),
        "model_layout": "merged" if plan.spec.merged else "standard",
        "modules_matched": len(pairs),
        "tensors": plan.tensors,
        "weights_changed": len({u.target for u in plan.updates}),
        "unmatched_keys": plan.unmatched,
        "ranks": sorted({p.rank for p in pairs.values()}),
        "scale": {"value": low if low == high else None, "min": low, "max": high, "source": lora.alpha_source},
        "capacity": capacity(plan),
        "warnings": lora.warnings + _warnings(lora, plan, scales),
        "modules": [
            {"path": path, "format": p.format, "rank": p.rank, "alpha": p.alpha, "rslora": p.rslora,
             "scale": scales[path]}
            for path, p in pairs.items()
        ],
    }


def capacity(plan: Plan) -> dict:
    """Rank reaching q, k and v in each attention stream, and how many LoRA parameters the file spends."""
    groups: dict[tuple[str, str], dict[str, int]] = {}
    params = qkv_params = 0
    for path, pair in plan.matched.items():
        n = pair.A.numel() + pair.B.numel()
        params += n
        if leaf(path) not in _QKV:
            continue
        qkv_params += n
        stream, part = _QKV[leaf(path)]
        g = groups.setdefault((path[: -len(leaf(path))], stream), dict.fromkeys((*algebra.PARTS, "joint"), 0))
        if part is None:
            shape = qkv.QKVShape.equal(pair.B.shape[0], plan.spec.head_dim)
            for name, r in algebra.reaching_rank(pair.B, shape, plan.spec.layout).items():
                g[name] += r
        else:
            g[part] += pair.rank
        g["joint"] += pair.rank
    if not groups:
        return {"qkv_streams": 0, "parameters": params, "qkv_parameters": 0}
    reach = {name: max(g[name] for g in groups.values()) for name in (*algebra.PARTS, "joint")}
    top = max(p.rank for path, p in plan.matched.items() if leaf(path) in _QKV)
    shared = all(reach[name] == reach["joint"] for name in algebra.PARTS)
    if any(_QKV[leaf(path)][1] is None for path in plan.matched if leaf(path) in _QKV):
        note = (f"fused q/k/v LoRA: one A for q, k and v, so together they reach rank <= {reach['joint']}; "
                f"separate rank-{top} LoRAs on q, k, v would reach {3 * top}"
                + (" (same rank, a third of the capacity)" if shared else
                   f" (this file's rank is split among them: q {reach['q']}, k {reach['k']}, v {reach['v']})"))
    else:
        note = (f"separate q/k/v LoRAs: together they reach rank <= {reach['joint']}; "
                f"a fused rank-{top} LoRA on the same stream would reach only {top}")
    return {
        "qkv_streams": len(groups),
        "rank_reaching": {name: reach[name] for name in algebra.PARTS},
        "joint_rank": reach["joint"],
        "parameters": params,
        "qkv_parameters": qkv_params,
        "note": note,
    }


def _warnings(lora: LoraFile, plan: Plan, scales: dict[str, float]) -> list[str]:
    pairs = plan.matched
    out = []
    if plan.unmatched:
        out.append(f"{len(plan.unmatched)} modules of the file match nothing in the model (a loader that skips "
                    f"them silently loads a partial LoRA), e.g. {plan.unmatched[0]}")
    if lora.alpha_source != NO_ALPHA and any(s != 1 for s in scales.values()):
        out.append(
            f"alpha present ({lora.alpha_source}): a loader that ignores it (DiffSynth: W += multiplier * B @ A) "
            f"applies multiplier 1 unless given {_fmt(scales)}"
        )
    if min(scales.values()) != max(scales.values()):
        out.append(f"scales disagree across modules: {_fmt(scales)}; no single multiplier reproduces training")
    bad = [p for p, x in pairs.items() if not (x.A.isfinite().all() and x.B.isfinite().all())]
    bad += [p for p, x in pairs.items() if x.alpha is not None and not math.isfinite(x.alpha)]
    if bad:
        out.append(f"NaN/Inf in {len(set(bad))} modules, e.g. {bad[0]}")
    zero = [p for p, x in pairs.items() if not x.B.ne(0).any()]
    if zero:
        out.append(f"all-zero B in {len(zero)} of {len(pairs)} modules (an untrained adapter?), e.g. {zero[0]}")
    for dtype in LOW_PRECISION:
        out += _underflow(dtype, pairs, scales, set(zero) | set(bad))
    return out


def _underflow(dtype: torch.dtype, pairs: dict, scales: dict[str, float], skip: set[str]) -> list[str]:
    """Modules whose whole delta W rounds to zero in `dtype`, and B entries that baking the scale in zeroes."""
    name = str(dtype).removeprefix("torch.")
    half_tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps / 2  # half the smallest subnormal
    vanish, baked, lost = [], [], 0
    for path, p in pairs.items():
        if path in skip:
            continue
        A, B = p.A.double().abs(), p.B.double().abs()
        bound = abs(scales[path]) * float((B.amax(dim=0) * A.amax(dim=1)).sum())  # >= every |delta W| entry
        if bound <= half_tiny:
            vanish.append(path)
        scaled = p.B.double() * scales[path]
        zeroed = int((scaled.ne(0) & scaled.to(dtype).eq(0)).sum())
        if zeroed:
            baked.append(path)
            lost += zeroed
    out = []
    if vanish:
        out.append(f"delta W underflows to zero in {name} in {len(vanish)} modules, e.g. {vanish[0]}")
    if baked:
        out.append(f"baking the scale into B in {name} zeroes {lost} non-zero entries in {len(baked)} modules")
    return out


def _fmt(scales: dict[str, float]) -> str:
    values = sorted(set(scales.values()))
    return ", ".join(f"{v:.6g}" for v in values[:4]) + (f" ... ({len(values)} values)" if len(values) > 4 else "")


def table(record: dict) -> str:
    """A readable summary of an audit record: headline numbers, then modules grouped across blocks."""
    s = record["scale"]
    value = "disagrees" if s["value"] is None else f"{s['value']:.6g}"
    lines = [
        f"format          {record['format']} (trained on a {record['layout']} model; "
        f"model is {record['model_layout']})",
        f"LoRA modules    {record['modules_matched']} matched, {len(record['unmatched_keys'])} unmatched",
        f"file tensors    {record['tensors']} used (A, B and alpha of matched modules)",
        f"weights changed {record['weights_changed']}",
        f"ranks           {', '.join(map(str, record['ranks']))}",
        f"scale           {value} "
        f"(min {s['min']:.6g}, max {s['max']:.6g}; {s['source']})",
    ]
    if "note" in record["capacity"]:
        lines.append(f"capacity        {record['capacity']['note']}")
    rows: dict[tuple, int] = {}
    for m in record["modules"]:
        key = (re.sub(r"\.\d+\.", ".*.", m["path"]), m["rank"], f"{m['scale']:.6g}")
        rows[key] = rows.get(key, 0) + 1
    width = max(len(k[0]) for k in rows)
    lines += ["", f"{'module':<{width}}  count  rank  scale"]
    lines += [f"{p:<{width}}  {n:>5}  {r:>4}  {sc}" for (p, r, sc), n in sorted(rows.items())]
    lines += [f"unmatched: {k}" for k in record["unmatched_keys"]]
    lines += [f"WARNING: {w}" for w in record["warnings"]]
    return "\n".join(lines)
