"""The `qkv-verify` command line: subcommands, and one place that turns bad input into exit status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from verify.bench import register_bench
from verify.convert import register as register_convert
from verify.errors import VerifyError
from verify.lora.cli import register as register_lora
from verify.qkv import LAYOUTS
from verify.regress import register_regress
from verify.tolerance import parse_dtypes


def _dtypes(text: str):
    try:
        return tuple(parse_dtypes(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def register_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="full model, standard vs merged, in each dtype -> summary.json, report.md, index.html",
        description="Exit status: 0 every check passed, 1 a check failed, 2 bad usage or input.",
    )
    p.add_argument("--checkpoint", type=Path, help="diffusers-layout transformer folder (config.json + safetensors)")
    p.add_argument("--merged-checkpoint", type=Path, help="your merged weights, compared against --checkpoint")
    p.add_argument("--layout", choices=LAYOUTS, default="blocked",
                   help="layout of --merged-checkpoint's fused tensors (never guessed from the weights)")
    p.add_argument("--config", choices=("tiny", "small", "full"), default="tiny",
                   help="seeded-weights config when no --checkpoint is given (default: tiny)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtypes", type=_dtypes, default=_dtypes("fp64,fp32,bf16,fp16"),
                   help="comma list of fp64,fp32,bf16,fp16 (fp64 and fp32 are always run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", type=Path, help="a LoRA file (any format lora-audit reads): standard+LoRA vs merged+LoRA")
    p.add_argument("--adapter-config", type=Path, help="PEFT adapter_config.json for --lora")
    p.add_argument("--out", type=Path, default=Path("qkv-verify-report"), help="output folder")
    p.set_defaults(func=_report)


def _report(args) -> int:
    from verify.render import write_report
    from verify.report import Options, run_report

    opts = Options(checkpoint=args.checkpoint, merged_checkpoint=args.merged_checkpoint, config=args.config,
                   layout=args.layout, device=args.device, dtypes=args.dtypes, seed=args.seed, lora=args.lora,
                   adapter_config=args.adapter_config)
    summary = run_report(opts)
    write_report(summary, args.out)
    failed = [c for c in summary["checks"] if not c["passed"]]
    print(f"verdict: {summary['verdict']} ({len(summary['checks']) - len(failed)}/{len(summary['checks'])} checks "
          f"passed); report in {args.out}/index.html")
    for c in failed:
        print(f"  FAILED {c['name']} [{c['dtype']}]: {c['message']}")
    return 0 if summary["verdict"] == "pass" else 1


REGISTRARS = [register_report, register_lora, register_regress, register_convert, register_bench]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qkv-verify", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except VerifyError as e:
        print(f"qkv-verify: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
