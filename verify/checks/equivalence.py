"""Run an equivalence case: the reference in fp64 (the oracle), then reference vs candidate in each dtype, judged by
verify.checks.compare. Both implementations come in through verify.implementations.candidate; diffusers is the default
reference."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from verify.checks.compare import Record, compare
from verify.checks.divergence import first_divergence, first_divergence_saved
from verify.checks.inputs import cast_inputs
from verify.checks.probes import standard_parameters
from verify.checks.runner import build_component, cast_copy, counting
from verify.checks.tolerance import GRADIENTS, OUTPUTS, dtype_name, floor_dtype
from verify.errors import VerifyError
from verify.implementations.candidate import Build, Implementation, oracle_precision, resolve
from verify.implementations.fused import default_processor
from verify.models.cases import Case, Outputs

GRAD_INPUTS = ("hidden_states", "encoder_hidden_states")
Spec = str | Build | Implementation


def implementation(spec: Spec | None, device: str = "cpu") -> Implementation:
    """An Implementation from a SPEC, a build callable or an Implementation; None: fuse_model's default processor
    on `device`."""
    if isinstance(spec, Implementation):
        return spec
    return resolve(default_processor(device) if spec is None else spec)


def run_case(case: Case, dtypes: Iterable[torch.dtype] | None = None, device: str = "cpu", seed: int = 0,
             config: dict | None = None, spec: object | None = None, candidate: Spec | None = None,
             reference: Spec | None = None, layout: str = "blocked",
             saved: dict[str, torch.Tensor] | None = None) -> list[Record]:
    """Records for `case` in each dtype: outputs (and gradients when the case asks) of the candidate vs the
    reference; `layout` splits the candidate's fused parameters when its weight gradients are mapped. `saved`, when
    given, receives the candidate's outputs keyed <case>/<dtype>/<output> and its input gradients keyed
    <case>/<dtype>/grad/<input> (verify.files.saved's format)."""
    cand_impl, ref_impl = implementation(candidate, device), implementation(reference or "diffusers")
    layout = cand_impl.layout or layout
    config, spec = config or case.config, spec or case.spec
    standard = case.build(config, seed)
    inputs = case.inputs(config, spec, seed)
    judge = _Judge(case, standard, inputs, device, seed, layout, config["attention_head_dim"])
    ref_module = build_component(ref_impl, cast_copy(standard, torch.float64, "cpu"), case.component)
    ref = judge.run(ref_impl, ref_module, torch.float64) if ref_module is not None else None  # the oracle
    records = []
    for dtype in dtypes or case.dtypes:
        base_module = build_component(ref_impl, cast_copy(standard, dtype, device), case.component)
        cand_module = build_component(cand_impl, cast_copy(standard, dtype, device), case.component)
        if cand_module is None or base_module is None:
            absent = (cand_impl, "candidate") if cand_module is None else (ref_impl, "reference")
            records += [judge.not_provided(kind, dtype, *absent) for kind in judge.kinds]
            continue
        base = judge.run(ref_impl, base_module, dtype)
        with counting(cand_module, cand_impl.fused_modules) as calls:
            cand = judge.run(cand_impl, cand_module, dtype)
        judge.check_shapes(cand_impl, base["outputs"], cand["outputs"])
        if saved is not None:
            saved.update({f"{case.name}/{dtype_name(dtype)}/{k}": v.detach().cpu() for k, v in cand["outputs"].items()})
            saved.update({f"{case.name}/{dtype_name(dtype)}/grad/{k.removeprefix('input.')}": v.detach().cpu()
                          for k, v in cand.get("gradients", {}).items() if k.startswith("input.") and v is not None})
        fused_calls = calls()
        for kind in judge.kinds:
            unsupported = next((run["unsupported"] for run in (ref, base, cand) if run.get("unsupported")), None)
            if kind == "gradients" and unsupported:
                records.append(judge.not_compared(kind, dtype, unsupported))
                continue
            record = judge.compare(kind, ref, base, cand, dtype, fused_calls, (ref_impl, cand_impl), ref_module)
            if not record.passed and (record.mismatched or record.nonfinite):
                record.first_divergence = judge.locate(ref_module, base_module, cand_module, dtype,
                                                       judge.floor(dtype, ref_impl, cand_impl))
            records.append(record)
    return records


def judge_saved(case: Case, saved: dict[torch.dtype, Outputs | None], engine: Implementation, seed: int = 0,
                reference: Spec | None = None, bases: dict[torch.dtype, Outputs | None] | None = None,
                gradients: dict[torch.dtype, Outputs | None] | None = None,
                base_gradients: dict[torch.dtype, Outputs | None] | None = None,
                modules: dict[torch.dtype, dict[str, tuple[torch.Tensor, ...]] | None] | None = None) -> list[Record]:
    """Records for `case` of outputs an engine saved per dtype (None: not provided), judged as run_case judges a
    candidate's: against the oracle (the reference in fp64), relative to the reference in that dtype, on the CPU;
    `bases`, when given, are saved outputs that replace that reference run (another machine's, another torch's).
    Where the case has gradients: `gradients` are the input gradients the engine saved per dtype (by input name; the
    vector-Jacobian product of cotangents(...)), judged as report judges gradients but on the inputs only; a dtype
    without them (or, with `bases`, without `base_gradients`) is recorded as not compared. `modules`: per dtype, the
    outputs of the engine's submodules under the standard's names, which locate a failing output's first_divergence
    (None: not located)."""
    ref_impl = implementation(reference or "diffusers")
    standard, inputs = case.build(case.config, seed), case.inputs(case.config, case.spec, seed)
    judge = _Judge(dataclasses.replace(case, grads=False), standard, inputs, "cpu", seed, "blocked",
                   case.config["attention_head_dim"])
    ref_module = build_component(ref_impl, cast_copy(standard, torch.float64, "cpu"), case.component)
    ref = judge.run(ref_impl, ref_module, torch.float64)
    records, ref_grads = [], None
    for dtype, outputs in saved.items():
        missing = engine if outputs is None else None if bases is None or bases[dtype] is not None else ref_impl
        if missing is not None:
            record = judge.not_provided("outputs", dtype, missing, "the engine")
            records.append(dataclasses.replace(record, message=f"not provided: {missing.spec} holds no outputs of "
                                                               f"{case.name} in {dtype_name(dtype)}"))
        else:
            base_module = build_component(ref_impl, cast_copy(standard, dtype, "cpu"), case.component)
            base = {"outputs": bases[dtype]} if bases is not None else judge.run(ref_impl, base_module, dtype)
            judge.check_shapes(engine, base["outputs"], outputs)
            record = judge.compare("outputs", ref, base, {"outputs": outputs}, dtype, None, (ref_impl, engine),
                                   ref_module)
            seen = (modules or {}).get(dtype)
            if seen and not record.passed and (record.mismatched or record.nonfinite):
                record.first_divergence = judge.locate_saved(ref_module, base_module, seen, dtype,
                                                             judge.floor(dtype, ref_impl, engine))
            records.append(record)
        if case.grads:
            given = (gradients or {}).get(dtype) or {}
            based = (base_gradients or {}).get(dtype) or {}
            lacking = [k for k in grad_inputs(inputs) if k not in given]
            absent = [k for k in given if k not in based] if bases is not None else []
            if not given:
                records.append(judge.not_compared("gradients", dtype, "the engine saved no input gradients"))
            elif lacking:
                records.append(judge.not_compared("gradients", dtype, f"the engine saved the input gradients of "
                                                  f"{', '.join(given)} but not of {', '.join(lacking)}"))
            elif absent:
                records.append(judge.not_compared("gradients", dtype, "the base outputs hold no input gradients" + (
                    f" of {', '.join(absent)}" if len(absent) < len(given) else "")))
            else:
                ref_grads = ref_grads or _run(case, ref_module, cast_inputs(inputs, torch.float64, "cpu"), True, seed)
                records.append(_saved_gradients(case, judge, standard, inputs, seed, dtype, ref_grads, given,
                                                (base_gradients or {}).get(dtype), (ref_impl, engine)))
    return records


def _saved_gradients(case: Case, judge: _Judge, standard: nn.Module, inputs: dict, seed: int, dtype: torch.dtype,
                     ref: dict, given: Outputs, base: Outputs | None,
                     impls: tuple[Implementation, Implementation]) -> Record:
    """The record of an engine's saved input gradients in `dtype`: against the oracle's (`ref`), relative to the
    reference's in that dtype (or `base`, saved)."""
    if ref.get("unsupported"):
        return judge.not_compared("gradients", dtype, ref["unsupported"])
    if base is None:
        run = _run(case, build_component(impls[0], cast_copy(standard, dtype, "cpu"), case.component),
                   cast_inputs(inputs, dtype, "cpu"), True, seed)
        if run.get("unsupported"):
            return judge.not_compared("gradients", dtype, run["unsupported"])
        base = {k.removeprefix("input."): v for k, v in run["gradients"].items() if k.startswith("input.")}
    sides = [{f"input.{k}": v for k, v in side.items()} for side in (
        {k.removeprefix("input."): v for k, v in ref["gradients"].items() if k.startswith("input.")}, base, given)]
    judge.check_shapes(impls[1], sides[1], sides[2])
    record = compare(f"{case.name}/gradients", case.component, sides[0], sides[2], GRADIENTS, dtype, "cpu",
                     base=sides[1], precision=impls[1].precision,
                     reference_precision=judge.oracle_precision(impls[0]))
    record.weight_gradients = "not compared: an engine saves input gradients only"
    return record


def grad_inputs(inputs: dict) -> tuple[str, ...]:
    """The inputs whose gradients a case with gradients judges (those of GRAD_INPUTS it has)."""
    return tuple(k for k in GRAD_INPUTS if k in inputs)


def cotangents(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """The seeded fp64 cotangents of outputs of `shapes`: the gradients judged are those of sum(output *
    cotangent) over the outputs."""
    g = torch.Generator().manual_seed(seed + 2)
    return {k: torch.randn(shape, generator=g, dtype=torch.float64) for k, shape in sorted(shapes.items())}


class _Judge:
    """One case's inputs and standard component: runs an implementation, names its gradients, judges a kind."""

    def __init__(self, case: Case, standard: nn.Module, inputs: dict, device: str, seed: int, layout: str,
                 head_dim: int):
        self.case, self.inputs, self.device, self.seed, self.layout, self.head_dim = (
            case, inputs, device, seed, layout, head_dim)
        self.parameters = {n for n, _ in standard.named_parameters()}
        self.modules = {n for n, _ in standard.named_modules() if n}
        self.kinds = ("outputs", "gradients") if case.grads else ("outputs",)

    def run(self, impl: Implementation, module: nn.Module, dtype: torch.dtype) -> dict[str, Outputs]:
        """Named outputs; with gradients of a seeded projection of them w.r.t. inputs and (standard-named) weights."""
        try:
            return _run(self.case, module, cast_inputs(self.inputs, dtype, _device(module)), self.case.grads,
                        self.seed)
        except VerifyError:
            raise
        except Exception as e:
            raise VerifyError(f"candidate {impl.spec} ({self.case.component}): calling it raised "
                              f"{type(e).__name__}: {e}") from None

    def check_shapes(self, impl: Implementation, base: Outputs, cand: Outputs) -> None:
        shapes = {k: tuple(v.shape) for k, v in base.items()}
        got = {k: tuple(v.shape) for k, v in cand.items()}
        if shapes != got:
            raise VerifyError(f"candidate {impl.spec} ({self.case.component}): returns {got} where the standard "
                              f"returns {shapes}")

    def compare(self, kind: str, ref: dict, base: dict, cand: dict, dtype: torch.dtype, fused_calls: int | None,
                impls: tuple[Implementation, Implementation], ref_module: nn.Module) -> Record:
        name = f"{self.case.name}/{kind}"
        if kind == "outputs":
            return compare(name, self.case.component, ref[kind], cand[kind], OUTPUTS, dtype, self.device,
                           base=base[kind], fused_calls=fused_calls, precision=impls[1].precision,
                           reference_precision=self.oracle_precision(impls[0]))
        sides, why = {}, ""
        for role, grads, impl in (("ref", ref, impls[0]), ("base", base, impls[0]), ("cand", cand, impls[1])):
            mapped, problem = self.weight_gradients(grads[kind], impl)
            sides[role] = mapped
            why = why or (problem and f"{'reference' if role != 'cand' else 'candidate'} {impl.spec}: {problem}")
        if why:
            sides = {role: {k: v for k, v in g.items() if k.startswith("input.")} for role, g in
                     (("ref", ref[kind]), ("base", base[kind]), ("cand", cand[kind]))}
        record = compare(name, self.case.component, sides["ref"], sides["cand"], GRADIENTS, dtype, self.device,
                         base=sides["base"], fused_calls=fused_calls, precision=impls[1].precision,
                         reference_precision=self.oracle_precision(impls[0]))
        record.weight_gradients = f"not compared: {why}" if why else "compared"
        return record

    def oracle_precision(self, reference: Implementation) -> str | None:
        return oracle_precision(reference, self.case.reference_precision)

    def floor(self, dtype: torch.dtype, reference: Implementation, candidate: Implementation) -> torch.dtype:
        """The dtype whose floor locates a divergence: as compare judges, by the candidate's and oracle's precision."""
        return floor_dtype(dtype, candidate.precision, self.oracle_precision(reference))

    def weight_gradients(self, gradients: Outputs, impl: Implementation) -> tuple[Outputs, str]:
        """Input gradients as they are, weight gradients renamed onto the standard's parameter names."""
        inputs = {k: v for k, v in gradients.items() if k.startswith("input.")}
        weights = {k[len("weight."):]: v for k, v in gradients.items() if k.startswith("weight.")}
        mapped, why = standard_parameters(weights, self.parameters, self.layout, self.head_dim)
        if mapped is None:
            return inputs, why
        return inputs | {f"weight.{k}": v for k, v in mapped.items()}, ""

    def not_provided(self, kind: str, dtype: torch.dtype, impl: Implementation, role: str) -> Record:
        return Record(f"{self.case.name}/{kind}", self.case.component, dtype_name(dtype), str(self.device),
                      (OUTPUTS if kind == "outputs" else GRADIENTS).describe(), False,
                      f"not provided: {role} {impl.spec} returns None for {self.case.component!r}", provided=False)

    def not_compared(self, kind: str, dtype: torch.dtype, why: str) -> Record:
        return Record(f"{self.case.name}/{kind}", self.case.component, dtype_name(dtype), str(self.device),
                      GRADIENTS.describe(), False, f"not compared: {why}", provided=False)

    def locate(self, ref: nn.Module, base: nn.Module, cand: nn.Module, dtype: torch.dtype,
               floor: torch.dtype) -> str | None:
        def forward(module: nn.Module, d: torch.dtype) -> None:
            self.case.outputs(module, cast_inputs(self.inputs, d, _device(module)))

        return first_divergence(ref, base, cand, forward, dtype, self.modules, floor)

    def locate_saved(self, ref: nn.Module, base: nn.Module, cand: dict[str, tuple[torch.Tensor, ...]],
                     dtype: torch.dtype, floor: torch.dtype) -> str | None:
        """locate with the candidate's submodule outputs given (an engine's, saved under the standard's names)."""
        def forward(module: nn.Module, d: torch.dtype) -> None:
            self.case.outputs(module, cast_inputs(self.inputs, d, _device(module)))

        return first_divergence_saved(ref, base, cand, forward, dtype, self.modules, floor)


def _device(module: nn.Module) -> str:
    param = next(module.parameters(), None)
    return "cpu" if param is None else str(param.device)


def _run(case: Case, module: nn.Module, inputs: dict, grads: bool, seed: int) -> dict[str, Outputs]:
    """Named outputs; with `grads`, also gradients of a seeded projection of them w.r.t. inputs and weights."""
    if not grads:
        with torch.no_grad():
            return {"outputs": case.outputs(module, inputs)}
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in grad_inputs(inputs)}
    inputs = {**inputs, **leaves}
    module.zero_grad(set_to_none=True)
    try:
        outputs = case.outputs(module, inputs)
        cots = cotangents({k: o.shape for k, o in outputs.items()}, seed)
        loss = sum((o * cots[k].to(o.device, o.dtype)).sum() for k, o in outputs.items())
        loss.backward()
    except NotImplementedError as e:  # flex_attention on the CPU: no backward here, judged on a GPU run
        if "does not support backward" not in str(e):
            raise
        outputs = _run(case, module, {k: v.detach() if k in leaves else v for k, v in inputs.items()}, False, seed)
        return outputs | {"unsupported": f"{str(e).split('. ')[0]} (judged where it runs: a GPU)"}
    gradients = {f"input.{k}": t.grad for k, t in leaves.items()}
    gradients.update({f"weight.{n}": p.grad for n, p in module.named_parameters() if p.grad is not None})
    return {"outputs": {k: o.detach() for k, o in outputs.items()}, "gradients": gradients}
