"""`qkv-verify report`: its flags, and the exit status from the verdict, user claims and the baseline."""

from __future__ import annotations

import argparse
from pathlib import Path

from verify.implementations.spec_names import BUILTINS


def _dtypes(text: str):
    from verify.checks.tolerance import parse_dtypes

    try:
        return tuple(parse_dtypes(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register_report(subparsers) -> None:
    from verify.commands.regress import add_threshold_arguments
    from verify.maths.qkv import LAYOUTS
    from verify.models import add_model_argument

    p = subparsers.add_parser(
        "report", help="full model, standard vs merged, in each dtype -> summary.json, report.md, index.html",
        description="Exit status: 0 every check passed (and no user claim refuted, nothing moved against "
                    "--baseline), 1 otherwise, 2 bad usage or input.",
    )
    add_model_argument(p)
    p.add_argument("--checkpoint", type=Path, help="diffusers-layout transformer folder (config.json + safetensors)")
    p.add_argument("--merged-checkpoint", type=Path, help="your merged weights, compared against --checkpoint")
    p.add_argument("--layout", choices=LAYOUTS, default="blocked",
                   help="layout of --merged-checkpoint's fused tensors (never guessed from the weights), and of a "
                        "--candidate's fused parameters when it declares none (to map its weight gradients)")
    p.add_argument("--config", choices=("tiny", "small", "full"), default="tiny",
                   help="seeded-weights config when no --checkpoint is given (default: tiny)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the tested dtypes run (the fp64 oracle runs there too); default cpu")
    p.add_argument("--dtypes", type=_dtypes, default=_dtypes("fp64,fp32,bf16,fp16"),
                   help="comma list of fp64,fp32,bf16,fp16 (fp64 and fp32 are always run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated weights and inputs (default 0)")
    p.add_argument("--lora", type=Path, help="a LoRA file (any format lora-audit reads): standard+LoRA vs merged+LoRA")
    p.add_argument("--adapter-config", type=Path, help="PEFT adapter_config.json for --lora")
    p.add_argument("--claims", type=Path, help="your claims (JSON or YAML), judged on this run like the write-up's")
    p.add_argument("--bench", type=Path, help="a `qkv-verify bench` JSON (or a folder holding one bench-*.json): "
                                              "speed section and the write-up's speed claims")
    p.add_argument("--properties", type=Path, help="property-suite results JSON (pytest -p properties.results_json)"
                                                   " for the attention/block claims")
    p.add_argument("--candidate", metavar="SPEC",
                   help="the implementation judged: package.module:attr, path/to/file.py:attr, or a built-in "
                        f"({', '.join(BUILTINS)}, and the planted bugs verify.planted:NAME); "
                        "attr is build(standard, component). Default: the processor fuse_model installs on --device")
    p.add_argument("--reference", metavar="SPEC",
                   help="what the candidate must match (same contract; default: diffusers' standard model); the "
                        "oracle is the reference in fp64")
    p.add_argument("--fused-modules", metavar="NAMES",
                   help="comma list of the module names whose calls prove the candidate's fused path ran (default "
                        "to_qkv,add_qkv_proj,to_added_qkv), or none for an unfused candidate")
    p.add_argument("--candidate-precision", choices=("fp64", "fp32"),
                   help="the finest arithmetic the candidate computes at: fp32 for one that computes in fp32 at best, "
                        "as GPU kernels do (its fp64 runs are then judged at fp32's floor; default: its build's "
                        "`precision` attribute, else fp64)")
    p.add_argument("--parallel", metavar="KIND=N",
                   help="also judge the merged model made parallel on N ranks it launches itself, as diffusers makes "
                        "it: tp=N (tensor parallel, the model's _tp_plan), ulysses=N or ring=N (context parallel, its "
                        "_cp_plan); CPU ranks over gloo, or with --device cuda one GPU a rank over NCCL (ring: cuda "
                        "only, bf16)")
    p.add_argument("--baseline", type=Path, help="a stored summary.json: report what moved (as `qkv-verify regress`)")
    p.add_argument("--save-outputs", type=Path, metavar="FILE",
                   help="also write the candidate's outputs of the attention, block and model cases to FILE "
                        "(safetensors, keyed <case>/<dtype>/<output> as `qkv-verify judge` reads them, and the input "
                        "gradients of the cases with gradients, <case>/<dtype>/grad/<input>), so that two "
                        "machines or torch versions can be judged against each other later (judge "
                        "--reference-outputs)")
    add_threshold_arguments(p)
    p.add_argument("--allow-unmatched", action="store_true",
                   help="LoRA keys that match no module do not fail the report (the lora/unmatched-keys check)")
    p.add_argument("--out", type=Path, default=Path("qkv-verify-report"),
                   help="output folder: new, empty, or an earlier qkv-verify report (default qkv-verify-report)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out that is not an earlier report")
    p.set_defaults(func=_report)


def _report(args) -> int:
    import hashlib

    from verify.checks.claims import check_claims, ledger, load_claims, refuted_user_claims
    from verify.checks.regress import load_summary, regress
    from verify.checks.report import Options, load_subject, run_report, run_values
    from verify.commands.regress import thresholds_from
    from verify.errors import VerifyError
    from verify.files.bench_file import load_bench
    from verify.files.folder import write_file
    from verify.files.property_results import load_property_results
    from verify.files.saved import tensor_bytes
    from verify.present.render import write_report

    _refuse_writing_into_inputs(args.out, _inputs(args))
    _refuse_foreign_out(args.out, args.force)
    if args.save_outputs and args.save_outputs.exists() and not args.force:
        raise VerifyError(f"--save-outputs {args.save_outputs}: exists; choose another file or pass --force")
    if args.save_outputs and not args.save_outputs.parent.is_dir():
        raise VerifyError(f"--save-outputs {args.save_outputs}: no such folder {args.save_outputs.parent}")
    baseline = load_summary(args.baseline) if args.baseline else None
    bench = load_bench(args.bench) if args.bench else None
    properties = load_property_results(args.properties) if args.properties else None
    opts = Options(checkpoint=args.checkpoint, merged_checkpoint=args.merged_checkpoint, config=args.config,
                   layout=args.layout, device=args.device, dtypes=args.dtypes, seed=args.seed, lora=args.lora,
                   adapter_config=args.adapter_config, candidate=args.candidate, reference=args.reference,
                   fused_modules=args.fused_modules, candidate_precision=args.candidate_precision,
                   allow_unmatched=args.allow_unmatched, parallel=args.parallel,
                   model=args.model)
    saved = {} if args.save_outputs else None
    subject = load_subject(opts)
    if args.claims:  # bad claims are bad input: refuse before running anything, paths checked against this run
        check_claims(load_claims(args.claims), run_values(args.dtypes, subject.model))
    summary = run_report(subject, opts, saved)
    summary["claims"] = ledger(summary, args.claims, bench, properties)
    summary["speed"] = bench
    if baseline is not None:
        summary["regression"] = regress(baseline, summary, thresholds_from(args))
    failed = [c for c in summary["checks"] if not c["passed"] and c.get("provided", True)]
    refuted = refuted_user_claims(summary["claims"])
    moved = summary["regression"]["moved"] if baseline is not None else []
    summary["verdict_reasons"] = verdict_reasons(failed, refuted, moved)
    summary["verdict"] = "fail" if summary["verdict_reasons"] else "pass"
    if saved is not None:  # first, so that the summary can cite the file by its hash
        data = tensor_bytes(saved)
        write_file(args.save_outputs, data)
        summary["inputs"]["saved_outputs"] = {"file": str(args.save_outputs),
                                              "sha256": hashlib.sha256(data).hexdigest()}
    write_report(summary, args.out)
    print(summary["compared"])
    why = f": {'; '.join(summary['verdict_reasons'])}" if summary["verdict_reasons"] else ""
    print(f"verdict: {summary['verdict']}{why} ({tally(summary['checks'])}); report in {args.out}/index.html")
    for c in failed:
        print(f"  FAILED {c['name']} [{c['dtype']}]: {c['message']}")
    for r in refuted:
        print(f"  REFUTED claim {r['id']}: measured {r['measured']}, expected {r['expected']}")
    if moved:
        print(f"  MOVED against {args.baseline}: {len(moved)} values beyond their thresholds")
    return 0 if summary["verdict"] == "pass" else 1


def tally(checks: list[dict]) -> str:
    """'P/N checks passed', and how many were not provided or not compared (neither a pass nor a failure)."""
    passed = sum(c["passed"] for c in checks)
    unjudged = sum(not c.get("provided", True) for c in checks)
    return f"{passed}/{len(checks)} checks passed" + (f", {unjudged} not provided or not compared" if unjudged else "")


def verdict_reasons(failed: list[dict], refuted: list[dict], moved: list[dict]) -> list[str]:
    """Why the verdict is fail (empty: pass); the exit status is 1 exactly when there is a reason."""
    reasons = [f"{len(failed)} check(s) failed"] if failed else []
    reasons += [f"refuted claim(s): {', '.join(r['id'] for r in refuted)}"] if refuted else []
    reasons += [f"moved against the baseline: {len(moved)} values"] if moved else []
    return reasons


def _refuse_foreign_out(out: Path, force: bool) -> None:
    """--out must be new, empty, or an earlier qkv-verify report (its summary.json says so), unless --force."""
    from verify.errors import VerifyError

    if out.exists() and not out.is_dir():
        raise VerifyError(f"--out {out}: is a file, not a folder")
    if out.is_symlink() and not out.exists():
        raise VerifyError(f"--out {out}: a symbolic link to nothing; choose another folder")
    if force or not out.exists() or not any(out.iterdir()):
        return
    if not _is_report(out / "summary.json"):
        raise VerifyError(f"--out {out}: a non-empty folder that is not an earlier qkv-verify report; choose another "
                          "folder or pass --force")


def _is_report(path: Path) -> bool:
    import json

    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"verdict", "checks", "environment"} <= set(summary)


INPUT_FLAGS = ("checkpoint", "merged_checkpoint", "lora", "adapter_config", "claims", "bench", "properties",
               "baseline")


def _inputs(args) -> dict[str, Path]:
    """Every path the report reads, by flag: the input files and folders, and the files of file.py SPECs."""
    given = {f"--{flag.replace('_', '-')}": getattr(args, flag) for flag in INPUT_FLAGS}
    for flag in ("candidate", "reference"):
        where = (getattr(args, flag) or "").rpartition(":")[0]
        given[f"--{flag}"] = Path(where) if where.endswith(".py") else None
    return {flag: path for flag, path in given.items() if path is not None}


def _refuse_writing_into_inputs(out: Path, inputs: dict[str, Path]) -> None:
    """--out must neither be nor lie inside an input, nor hold one: the report replaces files in --out, so an input
    there (a --baseline OUT/summary.json) would be overwritten by the run that reads it."""
    from verify.errors import VerifyError

    target = out.resolve()
    for flag, given in inputs.items():
        source = given.resolve()
        if target == source or target.is_relative_to(source):
            raise VerifyError(f"--out {out}: would write into the input {flag} {given}; choose another folder")
        if source.is_relative_to(target):
            raise VerifyError(f"--out {out}: holds the input {flag} {given}, which the report would overwrite; "
                              "choose another --out")
