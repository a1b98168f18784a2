"""`qkv-verify inputs` and `qkv-verify judge`: judge an implementation that cannot be imported (a serving engine, a
port, another runtime, another machine) through saved files, as Polygraphy saves a runner's results and judges them
later. `inputs` writes what an engine needs; `judge` computes the oracle and base here and judges what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

from verify.commands.report import _dtypes
from verify.models import DEFAULT_MODEL, add_model_argument

COMPONENTS = ("attention", "block", "model")


def register(subparsers) -> None:
    i = subparsers.add_parser(
        "inputs", description="Writes into --out, in safetensors only, every case's inputs per component and dtype, "
                              "the weights an engine must load (standard and merged, the diffusers layout), "
                              "manifest.json (each entry's component, case, dtype, keyword arguments and expected "
                              "outputs with their shapes) and README.txt. Exit status: 0 written, 2 bad input.")
    add_model_argument(i)
    i.add_argument("--config", choices=("tiny", "small"), default="tiny", help="seeded-weights config (default tiny)")
    i.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    i.add_argument("--fixture", action="append", metavar="NAME",
                   help="only the cases on this fixture of the model, e.g. text-to-image or edit (repeatable; "
                        "default all; an unknown name is refused, naming the model's fixtures)")
    i.add_argument("--component", choices=COMPONENTS, action="append",
                   help="attention, block or model (repeatable; default all)")
    i.add_argument("--dtypes", type=_dtypes, default=_dtypes("fp64,fp32,bf16,fp16"),
                   help="comma list of fp64,fp32,bf16,fp16 (default all)")
    i.add_argument("--out", type=Path, required=True, help="the folder to write (new or empty, else --force)")
    i.add_argument("--force", action="store_true", help="write into a non-empty --out")
    i.set_defaults(func=inputs_command)
    j = subparsers.add_parser(
        "judge", description="Judges the outputs an engine wrote for an inputs folder: the oracle and base are "
                             "computed here, each output judged by the relative-to-base rule; summary.json, "
                             "report.md and index.html as report writes them. Entries not written are recorded as "
                             "not provided; input gradients written for the manifest's cotangents "
                             "(<case>/<dtype>/grad/<input>) are judged too, else recorded as not compared; submodule "
                             "outputs under the standard's names (<case>/<dtype>/module/<name>/<i>) locate a "
                             "failing output's first divergence. Exit "
                             "status: 0 every provided output passed, 1 otherwise, 2 bad input "
                             "(extra or misshapen entries, NaN-only tensors, a manifest of another version, a "
                             "half-written file).")
    j.add_argument("outputs", type=Path, metavar="OUTPUTS", help="a safetensors file, or a folder of them, keyed "
                                                                  "<case>/<dtype>/<output>")
    j.add_argument("--inputs", type=Path, required=True, metavar="DIR", help="the folder qkv-verify inputs wrote")
    j.add_argument("--reference", metavar="SPEC", help="what the outputs must match (default: diffusers)")
    j.add_argument("--reference-outputs", type=Path, metavar="FILE",
                   help="outputs saved in the same format (report --save-outputs, or another engine's) that replace "
                        "the reference run here as base: two machines or two torch versions judged against each "
                        "other; the oracle is still computed here")
    j.add_argument("--candidate-precision", choices=("fp64", "fp32"),
                   help="the finest arithmetic the engine computes at: fp32 for one that computes in fp32 at best "
                        "(its fp64 outputs are then judged at fp32's floor; default fp64)")
    j.add_argument("--out", type=Path, default=Path("qkv-verify-judge"),
                   help="output folder: new, empty, or an earlier qkv-verify output (default qkv-verify-judge)")
    j.add_argument("--force", action="store_true", help="write into a non-empty --out that is not an earlier report")
    j.set_defaults(func=judge_command)


def inputs_command(args) -> int:
    from verify.commands.report import _refuse_foreign_out
    from verify.errors import VerifyError
    from verify.testing import save_inputs

    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise VerifyError(f"--out {args.out}: not empty; choose another folder or pass --force")
    _refuse_foreign_out(args.out, True)  # a file, or a link to nothing, is refused even with --force
    save_inputs(args.out, args.model or DEFAULT_MODEL, args.config, args.seed, args.component or COMPONENTS,
                args.dtypes, args.fixture)
    print(f"wrote {args.out}: the entries of {args.out / 'manifest.json'}; {args.out / 'README.txt'} says what an "
          "engine writes back")
    for left in json.loads((args.out / "manifest.json").read_text())["left_out"]:
        print(f"  left out: {left['case']} ({left['reason']})")
    return 0


def judge_command(args) -> int:
    from verify.commands.report import _refuse_foreign_out, _refuse_writing_into_inputs, tally, verdict_reasons
    from verify.present.render import write_report
    from verify.testing import judge_outputs

    _refuse_writing_into_inputs(args.out, {"OUTPUTS": args.outputs, "--inputs": args.inputs} | (
        {"--reference-outputs": args.reference_outputs} if args.reference_outputs else {}))
    _refuse_foreign_out(args.out, args.force)
    summary = judge_outputs(args.outputs, args.inputs, reference=args.reference, precision=args.candidate_precision,
                            reference_outputs=args.reference_outputs)
    failed = [c for c in summary["checks"] if not c["passed"] and c.get("provided", True)]
    summary["verdict_reasons"] = verdict_reasons(failed, [], [])
    write_report(summary, args.out)
    print(summary["compared"])
    print(f"verdict: {summary['verdict']} ({tally(summary['checks'])}); report in {args.out}/index.html")
    for c in failed:
        print(f"  FAILED {c['name']} [{c['dtype']}]: {c['message']}")
    return 0 if summary["verdict"] == "pass" else 1
