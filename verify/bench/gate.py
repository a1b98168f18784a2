"""The bench's gate: every arm judged before it is timed (verify.bench.judge), and the lean arm's processor."""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from verify.bench import judge as bench_judge
from verify.bench.options import Options


def judged_arms(blocks: dict[str, nn.Module], processor: str, outputs: dict[str, str]) -> dict[str, bench_judge.Arm]:
    """The merged and (where `blocks` has one) lean-unfused arms of `blocks` as the gate judges them, with the
    projections whose calls prove which path ran: the merged arm's fused ones, the lean arm's separate ones, each
    forbidding the other's. `outputs`: the model's BENCH_OUTPUTS."""
    from verify.implementations.candidate import resolve

    if not blocks:
        return {}
    impl = resolve(processor)
    arms = {"merged": bench_judge.Arm("merged", blocks["merged"], impl.fused_modules, outputs, bench_judge.SEPARATE,
                                      impl.layout or "blocked")}
    if "lean_unfused" in blocks:
        arms["lean_unfused"] = bench_judge.Arm("lean-unfused", blocks["lean_unfused"], bench_judge.SEPARATE, outputs,
                                               impl.fused_modules)
    return arms


def judge_arms(name: str, std: nn.Module, arms: dict[str, bench_judge.Arm], run: dict[str, nn.Module], inputs: dict,
               opts: Options, lora: bool = False) -> list[dict]:
    """Each arm's outputs and gradients at this size and mode (its timed module `run[arm]`) against the fp64 oracle
    of `std`, relative to the standard arm of the same mode (verify.bench.judge)."""
    outputs = next(iter(arms.values())).outputs
    ref = bench_judge.oracle(std, inputs, opts.seed, outputs)
    base = bench_judge.train_step(run["standard"], std, inputs, opts.seed, outputs)
    return [record for key, arm in arms.items()
            for record in bench_judge.judge(f"{name}/{arm.name}", arm, run[key], ref, base, inputs, opts.seed,
                                            opts.head_dim, lora=lora)]


def lean_check(name: str, module: nn.Module, inputs: dict) -> dict:
    """The lean-unfused block runs a lean-unfused processor over its separate projections (no merged block in
    disguise, no diffusers' processor), and in eager a compiled-region one enters its region."""
    before = _region_calls(module)
    with torch.no_grad():
        module(**inputs)
    problem = _lean_problem(module, before)
    return dict(name=name, rule="lean-unfused(processor, separate projections, region entered)",
                passed=problem is None, message=problem)


def _region_calls(module: nn.Module) -> int:
    from verify.implementations.fused import joint_attentions

    return sum(getattr(attn.processor, "region_calls", 0) for attn in joint_attentions(module))


def _lean_problem(module: nn.Module, regions_before: int | None) -> str | None:
    """Why `module` is not a lean-unfused block that ran its lean path (None: it is); regions_before: the region
    calls before an eager call (None: compiled, not counted)."""
    from verify.implementations.fused import joint_attentions
    from verify.implementations.lean_unfused import PROCESSORS, LeanUnfusedRegionQwenAttnProcessor

    attentions = joint_attentions(module)
    kinds = {type(attn.processor).__name__ for attn in attentions}
    if not attentions or not all(isinstance(attn.processor, tuple(PROCESSORS.values())) for attn in attentions):
        return f"the lean-unfused block runs {sorted(kinds)}, not a lean-unfused processor"
    if not all(hasattr(attn, n) for attn in attentions for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj",
                                                                  "add_v_proj")):
        return "the lean-unfused block lacks its separate q/k/v projections"
    regional = all(isinstance(attn.processor, LeanUnfusedRegionQwenAttnProcessor) for attn in attentions)
    if regions_before is not None and regional and _region_calls(module) <= regions_before:
        return "the lean-unfused block never entered its compiled region"
    return None


def has_no_separate_projections(module: nn.Module) -> bool:
    separate = {"to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"}
    return not any(name.rsplit(".", 1)[-1] in separate for name, _ in module.named_modules())


def sanity_check(name: str, base: tuple, cand: tuple) -> dict:
    """Merged vs standard output at a timed size: relative L2 error <= 2e-2 and cosine >= 0.999 (bf16 noise passes,
    a wrong kernel does not)."""
    b = torch.cat([t.double().flatten() for t in base])
    c = torch.cat([t.double().flatten() for t in cand])
    rel = float((c - b).norm() / b.norm())
    cosine = float(torch.nn.functional.cosine_similarity(c, b, dim=0))
    finite = bool(torch.isfinite(c).all())
    return dict(name=name, rule="sanity(rel_l2<=2e-2, cosine>=0.999)", rel_l2_err=rel, cosine=cosine,
                passed=finite and rel <= 2e-2 and cosine >= 0.999, bit_identical=bool(torch.equal(b, c)))
