"""The report run: the full model, standard vs merged, over the fixtures in each dtype -> one summary dict.

The model is streamed block by block (verify.checks.streaming), so the real width and real checkpoints fit. The summary
is data only; presentation lives in verify.present.render and verify.present.charts and never recomputes a verdict.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from verify import __version__, models
from verify.checks.compare import Record, compare, compare_exact
from verify.checks.equivalence import run_case
from verify.checks.runner import provides
from verify.checks.sharding import check_parallel, parallel_dtype, parse_parallel, rank_backend, require_even_split
from verify.checks.streaming import CheckpointSource, SeededSource, StateDictSource, StreamRun, run_streaming
from verify.checks.tolerance import OUTPUTS, dtype_name
from verify.errors import VerifyError
from verify.files import lora_formats as formats
from verify.files.checkpoint import Checkpoint
from verify.files.model_config import is_merged, merge_recorded, model_config
from verify.implementations.candidate import Implementation, oracle_precision, resolve, resolve_reference
from verify.implementations.fused import default_processor
from verify.implementations.loading import fuse_any
from verify.maths.naming import NAMINGS
from verify.maths.qkv import LAYOUTS
from verify.maths.state_dict import layout_hint, matching_layout, merge_state_dict, split_state_dict
from verify.models import qwen_image

REQUIRED_DTYPES = (torch.float64, torch.float32)  # bugs hide in bf16 noise: no verdict without these
SWEEP_FACTORS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 32.0)  # times the audited LoRA scale
SAMPLES = 64  # output values stored per fixture, dtype and implementation, for regression checks


@dataclass(frozen=True)
class Options:
    """What `qkv-verify report` was asked to do."""

    checkpoint: Path | None = None
    merged_checkpoint: Path | None = None
    config: str = "tiny"
    layout: str = "blocked"
    device: str = "cpu"
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    seed: int = 0
    lora: Path | None = None
    adapter_config: Path | None = None
    allow_unmatched: bool = False  # LoRA keys that match no module are a failed check unless allowed
    candidate: str | None = None  # a SPEC (implementations.candidate); None: fuse_model's default processor here
    candidate_precision: str | None = None  # override of the candidate's declared precision ("fp32")
    reference: str | None = None  # a SPEC; None: diffusers
    fused_modules: str | None = None  # override of the candidate's fused module names ("none": unfused)
    parallel: str | None = None  # "tp=N", "ulysses=N": the merged model also judged parallel on N CPU ranks
    model: str | None = None  # --model (verify.models); None: the checkpoint's config.json says, else qwen-image


@dataclass
class Subject:
    """What one report judges, opened and validated: the standard weights, the user's merged weights if any, the
    implementations, the LoRA planned onto both models, and the parallel layout."""

    std: StateDictSource
    cand: StateDictSource | None
    weight_checks: list[Record]
    candidate: Implementation = None
    reference: Implementation = None
    lora: _Lora | None = None
    parallel: tuple[str, int] | None = None  # (kind, ranks)
    model: str = models.DEFAULT_MODEL
    streamed: bool = True  # the whole-model checks stream the weights (model_checks); else judged case by case


def load_subject(opts: Options) -> Subject:
    """Validate and open every input before anything runs or is written. The embedded default (seeded tiny or small
    weights, no --lora) gets a seeded LoRA of the write-up's kind, made in memory."""
    model = models.choose(opts.model, {f"--{flag.replace('_', '-')} {path}": Checkpoint(path).config
                                       for flag, path in (("checkpoint", opts.checkpoint),
                                                          ("merged_checkpoint", opts.merged_checkpoint)) if path})
    streamed = opts.checkpoint or opts.merged_checkpoint or opts.lora or opts.config == "full"  # else case by case
    subject = weights_subject(opts, model) if model == models.DEFAULT_MODEL or streamed else _seeded(model, opts)
    subject.model = model
    subject.candidate = resolve(opts.candidate or default_candidate(model, opts.device), opts.fused_modules,
                                opts.candidate_precision)
    subject.reference = resolve_reference(opts.reference, models.load(model).REFERENCE_PRECISION)
    if opts.lora:
        subject.lora = _Lora(formats.read(opts.lora, opts.adapter_config), str(opts.lora), subject)
    elif embedded_lora(opts) and model == models.DEFAULT_MODEL:
        seeded = formats.parse(qwen_image.seeded_lora(qwen_image.model_config(opts.config), opts.seed), "seeded LoRA")
        subject.lora = _Lora(seeded, f"embedded: seeded rank-{qwen_image.LORA_RANK} LoRA on "
                                     f"{', '.join(qwen_image.LORA_TARGETS)}, alpha {qwen_image.LORA_ALPHA:g} "
                                     f"(seed {opts.seed})", subject)
    if opts.parallel:
        subject.parallel = parse_parallel(opts.parallel, opts.device, subject.candidate.spec, model)
        if opts.checkpoint or opts.config == "full":
            raise VerifyError(f"--parallel {opts.parallel}: shards seeded weights of --config tiny or small, not a "
                              "checkpoint or the full config")
        require_even_split(opts.parallel, *subject.parallel, model, subject.std.config, opts.seed)
    return subject


def _seeded(model: str, opts: Options) -> Subject:
    """Seeded weights of a model that the report judges case by case (whole, not streamed)."""
    module = models.load(model)
    config = module.model_config(opts.config)
    return Subject(StateDictSource(module.build_model(config, opts.seed).state_dict(), config), None, [],
                   streamed=False)


def default_candidate(model: str, device: str) -> str:
    """The processor fuse_model installs on `device`; Qwen-Image 2.1 has one fused processor, the reference."""
    return default_processor(device) if model == models.DEFAULT_MODEL else "reference"


def weights_subject(opts: Options, model: str = models.DEFAULT_MODEL) -> Subject:
    """The standard weights (seeded or a checkpoint) and the user's merged weights, streamed by model_checks."""
    if opts.merged_checkpoint and not opts.checkpoint:
        raise VerifyError("--merged-checkpoint needs --checkpoint (the standard weights to compare against)")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise VerifyError("--device cuda: no CUDA device is available")
    if not opts.checkpoint:
        arch = models.load(model)
        config = arch.model_config(opts.config)
        if opts.config == "full":
            return Subject(SeededSource(config, opts.seed, opts.device, model), None, [])
        return Subject(StateDictSource(arch.build_model(config, opts.seed).state_dict(), config), None, [])
    std_ckpt = Checkpoint(opts.checkpoint)
    if is_merged(std_ckpt):
        raise VerifyError(f"{opts.checkpoint}: holds fused to_qkv weights; pass it as --merged-checkpoint")
    config = model_config(std_ckpt)
    std = CheckpointSource(std_ckpt, config)
    if not opts.merged_checkpoint:
        return Subject(std, None, [finite_check(std_ckpt, "checkpoint")])
    merged_ckpt = Checkpoint(opts.merged_checkpoint)
    if not is_merged(merged_ckpt):
        raise VerifyError(f"{opts.merged_checkpoint}: holds no fused to_qkv weights; is it a standard checkpoint?")
    recorded = merge_recorded(merged_ckpt)
    if recorded and recorded["layout"] != opts.layout:
        raise VerifyError(f"{opts.merged_checkpoint}/config.json records layout {recorded['layout']}; pass --layout "
                          f"{recorded['layout']} (it was {opts.layout})")
    cand = CheckpointSource(merged_ckpt, config, opts.layout)
    checks = [finite_check(std_ckpt, "checkpoint"), finite_check(merged_ckpt, "merged-checkpoint")]
    return Subject(std, cand, [*checks, weight_check(std, cand)])


def finite_check(ckpt: Checkpoint, role: str) -> Record:
    """Every tensor of a checkpoint finite; a NaN or Inf is named (it would poison every output downstream)."""
    bad = ckpt.non_finite()
    name = f"inputs/finite-{role}"
    if not bad:
        return Record(name, "inputs", "fp64", "cpu", "finite", True, f"{len(ckpt.keys())} tensors, none NaN or Inf")
    listed = "; ".join(f"{k}: {nan} NaN, {inf} Inf" for k, (nan, inf) in list(bad.items())[:5])
    return Record(name, "inputs", "fp64", "cpu", "finite", False, f"{len(bad)} tensors hold NaN/Inf: {listed}",
                  nonfinite=sum(n + i for n, i in bad.values()))


def weight_check(std: StateDictSource, cand: StateDictSource) -> Record:
    """Split the merged weights block by block in the given layout; require them bit-identical to the standard."""
    naming, layout = cand.fused
    head_dim = std.config["attention_head_dim"]
    name = f"weights/split-{naming}-{layout}-equals-standard"
    parts = [("", std.top(), cand.top())]
    parts += [(f"transformer_blocks.{i}.", None, None) for i in range(std.config["num_layers"])]
    total = 0
    for prefix, expected, actual in parts:
        if expected is None:
            i = int(prefix.split(".")[1])
            expected, actual = std.block(i), split_state_dict(cand.block(i), naming, layout, head_dim)
        record = compare_exact(name, "weights", {prefix + k: v for k, v in expected.items()},
                               {prefix + k: v for k, v in actual.items()})
        if not record.passed:
            if prefix:  # a block: do its fused weights match in the other layout?
                found = matching_layout(expected, cand.block(i), naming, head_dim)
                record = replace(record, message=record.message + layout_hint(layout, found))
            return record
        total += record.numel
    return replace(record, numel=total, message=f"every tensor bit-identical after splitting ({total} values)")


def round_trip_checks(std: StateDictSource) -> list[Record]:
    """merge then split of every block's q/k/v, in each naming and layout: bit-identical to the weights given."""
    head_dim = std.config["attention_head_dim"]
    records = []
    for naming in NAMINGS:
        for layout in LAYOUTS:
            name, total = f"weights/round-trip-{naming}-{layout}", 0
            for i in range(std.config["num_layers"]):
                block = std.block(i)
                back = split_state_dict(merge_state_dict(block, naming, layout, head_dim), naming, layout, head_dim)
                record = compare_exact(name, "weights", block, back)
                if not record.passed:
                    break
                total += record.numel
            records.append(record if not record.passed else replace(
                record, numel=total, message=f"standard -> merged -> standard bit-identical ({total} values)"))
    return records


def component_checks(subject: Subject, dtypes: list[torch.dtype], device: str, seed: int, layout: str,
                     saved: dict[str, torch.Tensor] | None = None) -> list[Record]:
    """The model's registry cases (outputs and gradients), seeded, at the subject's width: attention and block; the
    whole-model cases too where the model is not streamed (Qwen-Image's is, by model_checks) or the candidate
    provides a model of its own (its own RoPE, text projection, modulation or masks are judged only there)."""
    config = subject.std.config
    width = {k: config[k] for k in ("num_attention_heads", "attention_head_dim", "axes_dims_rope")}
    components = ["attention", "block"]
    if not subject.streamed or provides_model(subject.candidate, config, seed, subject.model):
        components.append("model")
    return [r for case in models.load(subject.model).CASES.values() if case.component in components
            for r in run_case(case, dtypes, device, seed, config={**case.config, **width},
                              candidate=subject.candidate, reference=subject.reference, layout=layout, saved=saved)]


def provides_model(candidate: Implementation, config: dict, seed: int, model: str = models.DEFAULT_MODEL) -> bool:
    """Whether the candidate's build returns a model of its own for "model" (tried on a tiny seeded copy of the
    model)."""
    arch = models.load(model)
    tiny = {**arch.model_config("tiny"), **{k: config[k] for k in ("num_attention_heads", "attention_head_dim",
                                                                    "axes_dims_rope")}}
    return provides(candidate, arch.build_model(tiny, seed), "model")


def run_report(subject: Subject, opts: Options, saved: dict[str, torch.Tensor] | None = None) -> dict:
    """Judge the subject: its weights, the attention and block cases, every fixture through the streamed model (with
    the LoRA, and its sweep), the parallel model; and return the summary."""
    dtypes = list(dict.fromkeys([*REQUIRED_DTYPES, *opts.dtypes]))
    records = subject.weight_checks + ([subject.lora.unmatched_check(opts.allow_unmatched)] if subject.lora else [])
    records += round_trip_checks(subject.std) + component_checks(subject, dtypes, opts.device, opts.seed, opts.layout,
                                                                 saved)
    model_records, stats, samples = model_checks(subject, dtypes, opts) if subject.streamed else ([], [], [])
    records += model_records + parallel_checks(subject, opts)
    notes = [f"{dtype_name(d)} added: a verdict needs fp64 and fp32 runs (bugs hide in bf16 noise)"
             for d in REQUIRED_DTYPES if d not in opts.dtypes]
    notes += _implementation_notes(subject, records) + _bf16_notes(records)
    summary = {
        "verdict": "pass" if all(r.passed for r in records if r.provided) else "fail",
        "compared": "",
        "candidate": _described(subject.candidate, opts.candidate is None, opts.device),
        "reference": _described(subject.reference, opts.reference is None, opts.device),
        "checks": [r.to_dict() for r in records],
        "output_stats": stats,
        "output_samples": samples,
        "lora": subject.lora.summary if subject.lora else None,
        "environment": environment(opts.device),
        "inputs": inputs_section(opts, subject, dtypes),
        "notes": notes,
        "parallel": _parallel_section(subject, opts),
    }
    summary["compared"] = compared_line(summary)
    return summary


def model_checks(subject: Subject, dtypes: list[torch.dtype], opts: Options) -> tuple[list[Record], list, list]:
    """Every fixture of the model (the inputs of its whole-model cases) through the whole model, streamed block by
    block (verify.checks.streaming), without and with the LoRA, then the LoRA's sweep: (records, output stats,
    output samples)."""
    lora, arch = subject.lora, models.load(subject.model)
    records, stats, samples = [], [], []
    progress = tqdm(total=len(arch.FIXTURES) * (2 if lora else 1) + (len(SWEEP_FACTORS) if lora else 0),
                    desc="qkv-verify report", unit="run", leave=False, disable=not sys.stderr.isatty())
    for fixture, spec in arch.FIXTURES.items():
        inputs = arch.model_inputs(subject.std.config, spec, opts.seed)
        for section, updates in [("model", ()), *([("lora", lora.updates(1.0))] if lora else [])]:
            run = run_streaming(subject.std, inputs, dtypes, opts.device, subject.candidate, subject.reference,
                                subject.cand, *updates, model=subject.model)
            progress.update()
            records += _records(f"{section}/{fixture}", run, opts.device, subject)
            if section == "model":
                stats += _stats(fixture, run)
                samples += _samples(fixture, run)
    if lora:
        lora.summary["sweep"] = _sweep(subject, lora, opts, progress)
    progress.close()
    return records, stats, samples


def parallel_checks(subject: Subject, opts: Options) -> list[Record]:
    """The merged model made parallel on ranks of --device (verify.checks.sharding), when --parallel asks."""
    if not subject.parallel:
        return []
    kind, ranks = subject.parallel
    return check_parallel(kind, opts.layout, "merged", ranks, subject.candidate.spec, opts.seed, opts.config,
                          opts.device, model=subject.model)


def _parallel_section(subject: Subject, opts: Options) -> dict | None:
    if not subject.parallel:
        return None
    kind, ranks = subject.parallel
    return {"kind": kind, "degree": ranks, "device": opts.device, "backend": rank_backend(opts.device),
            "dtype": dtype_name(parallel_dtype(kind)), "processor": subject.candidate.spec,
            "plan": f"the merged model's {'_tp_plan' if kind == 'tp' else '_cp_plan'}",
            "weights": f"seeded {opts.config} config (seed {opts.seed})"}


def _bf16_notes(records: list[Record]) -> list[str]:
    """Checks that fp64 or fp32 fail while bf16 passes: why no verdict rests on bf16 alone."""
    by = {(r.name, r.dtype): r for r in records if r.provided}
    hidden = sorted({name for (name, dtype), r in by.items() if dtype == "bf16" and r.passed
                     and any(not by[(name, d)].passed for d in ("fp64", "fp32") if (name, d) in by)})
    if not hidden:
        return []
    return [f"bf16 alone would pass {len(hidden)} check(s) that fp64/fp32 fail ({', '.join(hidden)}): the "
            "difference hides in bf16 noise, which is why every verdict includes fp64 and fp32"]


def run_values(dtypes, model: str = models.DEFAULT_MODEL) -> dict[str, set[str]]:
    """The values the records of a run of `model` with `dtypes` take in the fields a claim's filter may name."""
    names = {dtype_name(d) for d in (*REQUIRED_DTYPES, *dtypes)}
    return {"dtype": names, "fixture": set(models.load(model).FIXTURES),
            "implementation": {"oracle", "standard", "merged"},
            "component": {"weights", "inputs", "attention", "block", "model", "lora"}}


def embedded_lora(opts: Options) -> bool:
    """The embedded default: seeded tiny or small weights and no LoRA file given."""
    return not opts.lora and not opts.checkpoint and opts.config != "full"


def _described(impl: Implementation, default: bool, device: str) -> dict:
    """summary.json's candidate/reference object; says when it is a default rather than the user's choice."""
    why = None
    if default:
        why = "diffusers' standard model (no --reference)" if impl.spec == "diffusers" else \
            f"the processor fuse_model installs by default on {device} (no --candidate)"
    return impl.describe() | {"default": why}


def compared_line(summary: dict) -> str:
    """One line saying what was compared (model, candidate, reference, weights, dtypes, device), whether the
    candidate's own model was judged whole, and where it first diverged when a check failed."""
    inputs, cand, ref = summary["inputs"], summary["candidate"], summary["reference"]
    weights = inputs["checkpoint"] or f"seeded {inputs['config']} config (seed {inputs['seed']})"
    if inputs["merged_checkpoint"]:
        weights += f" with merged weights {inputs['merged_checkpoint']} ({inputs['layout']})"
    declared = "" if cand["fused_modules"] else ", declared unfused"
    if cand.get("precision"):
        declared += f", declared {cand['precision']} precision (its fp64 runs judged at {cand['precision']}'s floor)"
    model = inputs.get("model", models.DEFAULT_MODEL)
    line = (f"{model}, candidate {cand['spec']}{' (' + cand['default'] + ')' if cand['default'] else ''}{declared} vs "
            f"reference {ref['spec']}{reference_precision(model, ref)}; weights: {weights}; "
            f"dtypes {','.join(inputs['dtypes'])}; device {inputs['device']}")
    cases = {name for name, case in models.load(model).CASES.items() if case.component == "model"}
    whole = sorted({c["name"].split("/")[0] for c in summary["checks"]} & cases)
    if whole:
        line += f"; the candidate's model judged whole ({', '.join(whole)})"
    diverged = [c for c in summary["checks"] if not c["passed"] and c.get("first_divergence")]
    if diverged:
        c = diverged[0]
        line += f"; first divergence: {c['name']} [{c['dtype']}] at {c['first_divergence']}"
    return line


def reference_precision(model: str, reference: dict) -> str:
    """The compared line's words on a reference whose fp64 run, the oracle, computes coarser than fp64 (summary.json's
    reference object): why, and that fp64 runs are judged at that precision's floor; empty for an fp64-precise one."""
    precision = reference.get("precision")
    if not precision:
        return ""
    why = models.load(model).REFERENCE_ROUNDING if reference["spec"] == "diffusers" else "declared"
    return f" ({why}: the oracle is {precision}-precise, so fp64 runs are judged at {precision}'s floor)"


def _implementation_notes(subject: Subject, records: list[Record]) -> list[str]:
    notes = []
    if not subject.candidate.fused:
        notes.append(f"candidate {subject.candidate.spec} is declared unfused: no fused-call proof; this compares "
                     "two implementations")
    absent = sorted({f"{r.name} ({r.message})" for r in records if not r.provided})
    notes += [f"not provided, not judged: {a}" for a in absent]
    return notes


def _records(name: str, run: StreamRun, device: str, subject: Subject) -> list[Record]:
    records = []
    reached = oracle_precision(subject.reference, models.load(subject.model).REFERENCE_PRECISION)
    for d in run.cand:
        record = compare(f"{name}/outputs", "model", run.ref, run.cand[d], OUTPUTS, d, device, base=run.base[d],
                         fused_calls=run.fused_calls[d], precision=subject.candidate.precision,
                         reference_precision=reached)
        if not record.passed:
            record.first_divergence = run.first_divergence[d]
        records.append(record)
    return records


def _stats(fixture: str, run: StreamRun) -> list[dict]:
    rows = [output_stats(fixture, "fp64", "oracle", run.ref["sample"])]
    for d in run.cand:
        rows.append(output_stats(fixture, dtype_name(d), "standard", run.base[d]["sample"]))
        rows.append(output_stats(fixture, dtype_name(d), "merged", run.cand[d]["sample"]))
    return rows


def output_stats(fixture: str, dtype: str, implementation: str, sample: torch.Tensor) -> dict:
    """Summary statistics of one output: more than the mean the write-up compared."""
    x = sample.detach().double().cpu().flatten()
    finite = x[torch.isfinite(x)]
    q = torch.quantile(finite, torch.tensor([0.01, 0.05, 0.5, 0.95, 0.99], dtype=torch.float64)).tolist() \
        if finite.numel() else [None] * 5
    return {
        "fixture": fixture, "dtype": dtype, "implementation": implementation,
        "mean": float(finite.mean()) if finite.numel() else None,
        "std": float(finite.std()) if finite.numel() > 1 else None,
        "min": float(finite.min()) if finite.numel() else None,
        "max": float(finite.max()) if finite.numel() else None,
        **dict(zip(("p1", "p5", "p50", "p95", "p99"), q)),
        "nan": int(torch.isnan(x).sum()), "inf": int(torch.isinf(x).sum()), "numel": x.numel(),
    }


def _samples(fixture: str, run: StreamRun) -> list[dict]:
    """A fixed, seed-independent set of output elements for each implementation: regression checks compare them."""
    numel = run.ref["sample"].numel()
    indices = torch.randperm(numel, generator=torch.Generator().manual_seed(0))[:SAMPLES].sort().values
    rows = [("fp64", "oracle", run.ref["sample"])]
    rows += [(dtype_name(d), impl, outs[d]["sample"]) for d in run.cand
             for impl, outs in (("standard", run.base), ("merged", run.cand))]
    return [{"fixture": fixture, "dtype": dtype, "implementation": impl, "indices": indices.tolist(),
             "values": [_finite_or_none(v) for v in x.detach().double().cpu().flatten()[indices].tolist()]}
            for dtype, impl, x in rows]


def _finite_or_none(v: float) -> float | None:
    return v if v == v and abs(v) != float("inf") else None


class _Lora:
    """A LoRA file planned onto both models: its load report and audit, and per-block updates at a factor."""

    def __init__(self, file: formats.LoraFile, name: str, subject: Subject):
        from verify.checks import lora_audit as audit
        from verify.files import lora_mapping as mapping

        self.file = file
        config, arch = subject.std.config, models.load(subject.model)
        naming, layout = subject.cand.fused if subject.cand else ("seed", "blocked")
        self.std_plan = mapping.plan(self.file, mapping.spec_of(arch.empty_model(config)))
        self.cand_plan = mapping.plan(self.file, mapping.spec_of(fuse_any(arch.empty_model(config), naming, layout)))
        record = audit.audit(self.file, self.std_plan)
        self.scale = record["scale"]["value"]
        self.summary = {"file": name, **{k: record[k] for k in (
            "format", "layout", "modules_matched", "tensors", "weights_changed", "unmatched_keys", "ranks",
            "scale", "capacity", "warnings")}}
        self.summary["modules"] = [{"target": u.target, "sources": list(u.sources), "rank": u.factors.rank,
                                    "scale": u.factors.scale} for u in self.cand_plan.updates]
        # The product's processors fuse under the standard names: the LoRA lands on their fused projections in the
        # merged layout. Another candidate's module names are its own: it builds from LoRA-updated standard weights.
        self.merged_layout = (subject.candidate.resolved.startswith("verify.implementations.builtins:")
                              and subject.candidate.fused)
        self.summary["applied_to_candidate"] = ("merged layout, onto the fused projections" if self.merged_layout
                                                else "standard layout, onto the weights the candidate builds from")

    def unmatched_check(self, allowed: bool) -> Record:
        """LoRA keys that land on no module: a failed check (a LoRA silently half-applied) unless allowed."""
        keys = self.summary["unmatched_keys"]
        if not keys:
            return Record("lora/unmatched-keys", "lora", "fp64", "cpu", "all-matched", True,
                          f"every key of the file lands on a module ({self.summary['modules_matched']} modules)")
        listed = f"{len(keys)} keys match no module of the model: {', '.join(keys[:5])}"
        if allowed:
            return Record("lora/unmatched-keys", "lora", "fp64", "cpu", "all-matched", True,
                          f"{listed} (allowed by --allow-unmatched)")
        return Record("lora/unmatched-keys", "lora", "fp64", "cpu", "all-matched", False,
                      f"{listed}; pass --allow-unmatched if that is intended")

    def updates(self, factor: float):
        """(standard update, merged update or None): functions applying the LoRA at `factor` x its scale."""
        merged = _updater(self.cand_plan.updates, factor) if self.merged_layout else None
        return _updater(self.std_plan.updates, factor), merged


def _updater(updates, factor: float):
    @torch.no_grad()
    def update(module: torch.nn.Module, prefix: str) -> None:
        for u in updates:
            if u.target.startswith(prefix) and (prefix or not u.target.startswith("transformer_blocks.")):
                W = module.get_submodule(u.target[len(prefix):]).weight
                W += (factor * u.factors.delta(torch.promote_types(W.dtype, torch.float32))).to(W.dtype)

    return update


def _sweep(subject: Subject, lora: _Lora, opts: Options, progress) -> list[dict]:
    """Output deviation from the base model as the LoRA multiplier grows, standard and merged, in fp32."""
    arch = models.load(subject.model)
    fixture, spec = next(iter(arch.FIXTURES.items()))
    inputs = arch.model_inputs(subject.std.config, spec, opts.seed)
    rows, base = [], None
    for factor in SWEEP_FACTORS:
        run = run_streaming(subject.std, inputs, [torch.float32], opts.device, subject.candidate, subject.reference,
                            subject.cand, *lora.updates(factor), model=subject.model)
        progress.update()
        outs = {"oracle": run.ref["sample"], "standard": run.base[torch.float32]["sample"],
                "merged": run.cand[torch.float32]["sample"]}
        base = base or outs  # factor 0 comes first: the base model
        row = {"fixture": fixture, "factor": factor,
               "multiplier": None if lora.scale is None else factor * lora.scale,
               "merged_vs_standard_max_abs": float((outs["merged"].double() - outs["standard"].double()).abs().max())}
        for impl, x in outs.items():
            ref = base[impl].double()
            row[f"{impl}_rel_dev"] = float((x.double() - ref).norm() / ref.norm())
            row[f"{impl}_mean"], row[f"{impl}_std"] = float(x.double().mean()), float(x.double().std())
        rows.append(row)
    return rows


def environment(device: str) -> dict:
    import diffusers
    import numpy

    env = {
        "qkv_verify": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": numpy.__version__,
        "device": device,
    }
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    return env


def inputs_section(opts: Options, subject: Subject, dtypes: list[torch.dtype]) -> dict:
    return {
        "model": subject.model,
        "checkpoint": str(opts.checkpoint) if opts.checkpoint else None,
        "merged_checkpoint": str(opts.merged_checkpoint) if opts.merged_checkpoint else None,
        "lora": subject.lora.summary["file"] if subject.lora else None,
        "config": None if opts.checkpoint else opts.config,
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in subject.std.config.items()},
        "layout": opts.layout if opts.merged_checkpoint else "blocked",
        "seed": opts.seed,
        "dtypes": [dtype_name(d) for d in dtypes],
        "device": opts.device,
        "fixtures": {name: asdict(spec) for name, spec in models.load(subject.model).FIXTURES.items()},
    }
