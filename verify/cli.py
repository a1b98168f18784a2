"""qkv-verify checks that a Qwen-Image transformer whose q, k and v projections are fused into one matrix (merged
QKV) computes the same function as diffusers' standard model, and converts checkpoints and LoRA files between the two
layouts. `qkv-verify COMMAND --help` lists a command's flags and its exit status; bad input always exits 2 with one
line saying what is wrong and where."""

from __future__ import annotations

import argparse
import importlib
import sys

from verify import __version__
from verify.errors import run_command

# command -> (module, registrar, the line `qkv-verify --help` shows). A registrar is imported only when its command
# runs (or asks for its --help): `qkv-verify --help` imports neither torch nor diffusers.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "report": ("verify.commands.report", "register_report",
               "check a merged model against the standard one over the whole model, in every dtype (and a LoRA): "
               "summary.json, report.md, index.html"),
    "test": ("verify.commands.test", "register_test",
             "run the packaged property suite against your implementation (SPEC)"),
    "lora-audit": ("verify.commands.lora", "register",
                   "say what a LoRA file does to a standard or merged Qwen-Image model"),
    "lora-convert": ("verify.commands.lora", "register",
                     "convert a LoRA between separate q/k/v and fused QKV, keeping delta W exactly"),
    "lora-compare": ("verify.commands.lora", "register",
                     "do two LoRA files change the model by the same delta W? (catches a broken converter)"),
    "regress": ("verify.commands.regress", "register_regress",
                "compare two summary.json files: which outputs, samples and check metrics moved"),
    "convert": ("verify.commands.convert", "register",
                "stream a checkpoint between standard and merged QKV; --check proves a conversion"),
    "sample": ("verify.commands.sample", "register_sample",
               "judge a sampling run step by step against an fp64 oracle: latents per step, the final image"),
    "inputs": ("verify.commands.engines", "register",
               "write the inputs, weights and manifest an engine you cannot import runs (then: judge)"),
    "judge": ("verify.commands.engines", "register",
              "judge the outputs an engine wrote for an inputs folder, against an fp64 oracle computed here"),
    "bench": ("verify.commands.bench", "register_bench",
              "standard vs merged block speed: forward and training step, eager and torch.compile"),
}


class _Only:
    """The subparsers object a registrar sees: it adds only `name` (a registrar may add several commands), with
    the one-line help of COMMANDS."""

    def __init__(self, subparsers, name: str):
        self.subparsers, self.name = subparsers, name

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        if name != self.name:
            return argparse.ArgumentParser(add_help=False)  # another command of the same registrar: not wanted now
        return self.subparsers.add_parser(name, **{**kwargs, "help": COMMANDS[name][2]})


def parser(*commands: str) -> argparse.ArgumentParser:
    """The qkv-verify parser with the full flags of `commands` (every command: parser(*COMMANDS)); the others are
    listed by name and one line only, so that building it imports nothing a command of `commands` does not need."""
    p = argparse.ArgumentParser(prog="qkv-verify", description=__doc__)
    p.add_argument("--version", action="version", version=f"qkv-verify {__version__}")
    sub = p.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    for name, (module, registrar, line) in COMMANDS.items():
        if name in commands:
            getattr(importlib.import_module(module), registrar)(_Only(sub, name))
        else:
            sub.add_parser(name, help=line, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    passed = []  # `qkv-verify test SPEC ... -- PYTEST_ARGS`: what follows `--` is pytest's, never ours
    if command == "test" and "--" in argv:
        argv, passed = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser(*([command] if command in COMMANDS else [])).parse_args(argv)
    if passed:
        args.pytest_args = passed
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
