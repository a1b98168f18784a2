"""`qkv-verify convert`: a checkpoint streamed between standard and merged QKV, and `--check` that proves a conversion.

The command's arguments and its run; planning, writing and checking are verify.files.convert's.
"""

from __future__ import annotations

from pathlib import Path

from verify.errors import VerifyError
from verify.files import manifest as mf
from verify.files.convert import DIRECTIONS, check, convert, fused_leaves, open_checkpoint
from verify.maths.naming import NAMINGS, streams
from verify.maths.qkv import LAYOUTS
from verify.models import add_model_argument, choose, config_of


def register(subparsers) -> None:
    """Add `convert` to the qkv-verify command line."""
    c = subparsers.add_parser(
        "convert", help="stream a checkpoint between standard and merged QKV; --check proves a conversion",
        description="Exit status: 0 written (with --check: proven), 1 (--check) a tensor differs, 2 bad input.",
    )
    c.add_argument("src", type=Path, metavar="SRC",
                   help="diffusers transformer folder (config.json + safetensors) or one file")
    c.add_argument("dst", type=Path, metavar="DST",
                   help="output folder (never inside SRC; written beside, renamed when complete); with --check: the "
                        "conversion to prove")
    # choices listed by metavar, checked by the command itself: a bad value is one error line (exit 2), as elsewhere
    c.add_argument("--to", metavar="{" + ",".join(DIRECTIONS) + "}",
                   help="layout to write: merged (fused q/k/v) or standard (separate q, k, v); with --check: "
                        "inferred from SRC")
    c.add_argument("--naming", metavar="{" + ",".join(NAMINGS) + "}",
                   help="fused names: seed (to_qkv, add_qkv_proj; default) or diffusers (to_qkv, to_added_qkv); "
                        "with --check and a merged SRC or DST: detected from the tensor names")
    c.add_argument("--layout", metavar="{" + ",".join(LAYOUTS) + "}",
                   help="fused rows: blocked (all q, all k, all v; default) or interleaved (per head); with --check: "
                        "DST's manifest, else blocked")
    add_model_argument(c, "the model of SRC")
    c.add_argument("--force", action="store_true", help="replace an existing DST")
    c.add_argument("--check", action="store_true",
                   help="prove that DST holds exactly SRC's tensors, converted (reads both in full; exit 1 if not)")
    c.set_defaults(func=command)


def command(args) -> int:
    choose(args.model, {f"SRC {args.src}": config_of(args.src)})  # a --model that contradicts SRC is refused
    if args.naming is not None:
        streams(args.naming)
    if args.layout is not None and args.layout not in LAYOUTS:
        raise VerifyError(f"unknown layout {args.layout!r}; expected one of {', '.join(LAYOUTS)}")
    if args.to is not None and args.to not in DIRECTIONS:
        raise VerifyError(f"unknown --to {args.to!r}; expected merged or standard")
    if args.check:
        if args.to is not None and args.to != _direction(args.src):
            raise VerifyError(f"--to {args.to}: SRC {args.src} converts to {_direction(args.src)}")
        verdict = check(args.src, args.dst, args.naming, args.layout)
        print(verdict.message if verdict.proven else f"not proven: {verdict.message}")
        return 0 if verdict.proven else 1
    if args.to is None:
        raise VerifyError("convert needs --to merged or --to standard (or --check)")
    r = convert(args.src, args.dst, args.to, args.naming, args.layout, args.force)
    gb = r.nbytes / 1e9
    print(f"wrote {r.dst}: {len(r.plan.out)} tensors in {r.shards} shard(s), {r.plan.to} (naming {r.plan.naming}, "
          f"layout {r.plan.layout}), {gb:.3f} GB in {r.seconds:.1f} s ({gb / max(r.seconds, 1e-9):.2f} GB/s); "
          f"manifest {r.dst / mf.NAME}")
    return 0


def _direction(src: Path) -> str:
    return "standard" if fused_leaves(open_checkpoint(src)) else "merged"
