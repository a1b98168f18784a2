"""The `qkv-verify` command line: subcommands, and one place that turns bad input into exit status 2."""

from __future__ import annotations

import argparse
import sys

from verify.bench import register_bench
from verify.convert import register as register_convert
from verify.errors import run_command
from verify.lora.cli import register as register_lora
from verify.regress import register_regress
from verify.report_cli import register_report
from verify.suite_cli import register_test

REGISTRARS = [register_report, register_test, register_lora, register_regress, register_convert, register_bench]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qkv-verify", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
