"""The `lora-audit`, `lora-convert` and `lora-compare` subcommands; bad input raises VerifyError (exit status 2 in
verify.cli). Registering them imports neither torch nor diffusers: each command imports what it needs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from verify.errors import VerifyError
from verify.files.folder import refuse_output_file
from verify.maths.naming import LAYOUTS, NAMINGS
from verify.models import add_model_argument, choose, config_of

OUTPUT_PREFIX = "diffusion_model."  # ComfyUI / ai-toolkit keys with per-module .alpha: widely loadable, scale explicit
SCALE_NOTE = "per-module .alpha keys: multiplier = alpha / rank reproduces the source's trained scale"
CONFIG_NAMES = ("tiny", "small", "full")  # verify.models.qwen_image.CONFIGS
LORA_HELP = "LoRA .safetensors file (any format lora-audit reads), or a PEFT save_pretrained folder"


def register(subparsers) -> None:
    """Add `lora-audit`, `lora-convert` and `lora-compare` to the qkv-verify command line."""
    a = subparsers.add_parser(
        "lora-audit", help="say what a LoRA file does to a standard or merged Qwen-Image model",
        description="What a LoRA file does to a model: modules matched and unmatched, weights changed, ranks, the "
                    "scale and where it comes from, q/k/v capacity, and warnings. Exit status: 0 the audit ran "
                    "(warnings do not fail it unless --strict), 1 --strict and a warning, 2 bad input.",
    )
    a.add_argument("lora", type=Path, metavar="LORA", help=LORA_HELP)
    _model_args(a, "the full-size Qwen-Image (--config full)")
    a.add_argument("--json", type=Path, metavar="FILE", help="write the audit record here as JSON")
    a.add_argument("--force", action="store_true", help="replace an existing --json FILE")
    a.add_argument("--strict", action="store_true", help="exit 1 when the audit has any warning (for CI gates)")
    a.set_defaults(func=audit_command)
    c = subparsers.add_parser(
        "lora-convert", help="convert a LoRA between separate q/k/v and fused QKV, keeping delta W exactly",
        description="Writes SRC in the other q/k/v layout with each module's scale in an .alpha key, delta W "
                    "unchanged. A LoRA already in --to's layout (and naming) is refused: there is nothing to "
                    "convert. Exit status: 0 written, 2 bad input (DST exists without --force, SRC already in "
                    "that layout, a LoRA that does not fit the model).",
    )
    c.add_argument("src", type=Path, metavar="SRC", help=LORA_HELP + " to read")
    c.add_argument("dst", type=Path, metavar="DST",
                   help="converted LoRA to write (never SRC; written atomically; an existing DST needs --force)")
    c.add_argument("--to", choices=("merged", "standard"), required=True,
                   help="layout of the written LoRA: merged (fused q/k/v) or standard (separate q, k, v)")
    c.add_argument("--naming", choices=tuple(NAMINGS), default="seed",
                   help="fused names with --to merged: seed (to_qkv, add_qkv_proj; default) or diffusers "
                        "(to_qkv, to_added_qkv)")
    _model_args(c, "the sizes the file itself implies (q, k and v equal, as in every Qwen-Image)")
    c.add_argument("--force", action="store_true", help="replace an existing DST")
    c.set_defaults(func=convert_command)
    m = subparsers.add_parser(
        "lora-compare", help="do two LoRA files change the model by the same delta W? (catches a broken converter)",
        description="Whether LoRA files A and B (any formats, either q/k/v layout) change every weight of the model by "
                    "the same delta W, each at its own file's scale: per module ||dW_A - dW_B|| / ||dW_A|| against "
                    "a tolerance from the files' dtype (torch.testing's default rtol for the least precise dtype of "
                    "their A and B tensors), the scales, and the modules only one of them touches. Exit status: 0 "
                    "the same within the tolerance, 1 different, 2 bad input.",
    )
    m.add_argument("a", type=Path, metavar="A", help=LORA_HELP + ": the reference (e.g. the original)")
    m.add_argument("b", type=Path, metavar="B", help=LORA_HELP + ": compared against A (e.g. a conversion of it)")
    _model_args(m, "the sizes the files themselves imply", adapter_config=False)
    m.add_argument("--json", type=Path, metavar="FILE", help="write the comparison record here as JSON")
    m.add_argument("--force", action="store_true", help="replace an existing --json FILE")
    m.set_defaults(func=compare_command)


def _model_args(p, default: str, adapter_config: bool = True) -> None:
    add_model_argument(p, "the model the LoRA is for")
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", type=Path, metavar="DIR",
                       help="diffusers checkpoint folder, standard or merged; only config.json and the tensor headers "
                            f"are read (default: {default})")
    model.add_argument("--config", choices=CONFIG_NAMES,
                       help=f"a named model config, built on the meta device (default: {default})")
    p.add_argument("--layout", choices=LAYOUTS, default="blocked",
                   help="row layout of fused q/k/v: blocked (all q, all k, all v; default) or interleaved (per head)")
    if adapter_config:
        p.add_argument("--adapter-config", type=Path, metavar="FILE",
                       help="PEFT adapter_config.json (default: the file's metadata, else adapter_config.json "
                            "beside it)")


def _spec(args, loras=None):
    """The model the LoRA is held to: --checkpoint, --config, else the full model (`loras` None) or the sizes the
    files `loras` imply."""
    from verify.checks import lora_checkpoint as checkpoint

    model = choose(args.model, {f"--checkpoint {args.checkpoint}": config_of(args.checkpoint)}
                   if args.checkpoint else {})
    if args.checkpoint is not None:
        return checkpoint.spec_from_checkpoint(args.checkpoint, args.layout)
    if args.config is not None or loras is None:
        return checkpoint.spec_from_config(args.config or "full", args.layout, model)
    return checkpoint.spec_from_files(loras, args.layout, model)


def _plan(lora, spec, args):
    """mapping.plan, with the fix in the message when the default full-size model does not fit the file."""
    from verify.files import lora_mapping as mapping

    try:
        return mapping.plan(lora, spec)
    except mapping.ShapeMismatch as e:
        if args.checkpoint is None and args.config is None:
            raise VerifyError(f"{e} No model was given, so the full-size Qwen-Image was assumed: pass --checkpoint "
                              "DIR (the model the LoRA was trained for), or --config tiny|small") from None
        raise


def audit_command(args) -> int:
    """Audit a LoRA file: print a table, optionally write the JSON record; 0 once the audit ran (1: --strict and a
    warning)."""
    from verify.checks.lora_audit import audit, table
    from verify.files import lora_formats as formats

    refuse_output_file("--json", args.json, {"LORA": args.lora, "--adapter-config": args.adapter_config},
                       args.force)
    lora = formats.read(args.lora, args.adapter_config)
    record = audit(lora, _plan(lora, _spec(args), args))
    if args.json is not None:  # first: the file is written even when a reader of the table goes away (| head)
        _write_text(args.json, json.dumps(_strict(record), indent=2, allow_nan=False))
    print(table(record))
    if args.strict and record["warnings"]:
        print(f"--strict: {len(record['warnings'])} warning(s)")
        return 1
    return 0


def convert_command(args) -> int:
    """Write SRC converted to --to's layout, with each module's scale carried in an .alpha key."""
    import torch

    from verify.files import lora_formats as formats
    from verify.files import lora_mapping as mapping

    src = formats.lora_file(args.src)
    if args.dst.exists() and src.exists() and args.dst.resolve() == src.resolve():
        raise VerifyError(f"{args.dst}: refusing to overwrite the source LoRA")
    if not args.dst.parent.is_dir():
        raise VerifyError(f"{args.dst.parent}: no such folder")
    if args.dst.is_dir():
        raise VerifyError(f"{args.dst}: is a folder; DST is the .safetensors file to write")
    if (args.dst.exists() or args.dst.is_symlink()) and not args.force:  # a dangling link too: it is the user's
        raise VerifyError(f"{args.dst}: exists; pass --force to replace it")
    lora = formats.read(args.src, args.adapter_config)
    spec = _spec(args, [lora])
    plan = _plan(lora, mapping.retarget(spec, args.to, args.naming), args)
    if all(u.sources == (u.target,) for u in plan.updates):
        naming = f" with the {args.naming} naming" if args.to == "merged" else ""
        raise VerifyError(f"{args.src}: already in the {args.to} layout{naming} (every module stays where it is); "
                          "nothing to convert, nothing written")
    tensors = {}
    for u in plan.updates:
        key = OUTPUT_PREFIX + u.target
        tensors[f"{key}.lora_A.weight"] = u.factors.A
        tensors[f"{key}.lora_B.weight"] = u.factors.B
        tensors[f"{key}.alpha"] = torch.tensor(u.factors.scale * u.factors.rank, dtype=torch.float64)
    used = {id(p) for p in plan.matched.values()}
    passed = [p for p in lora.pairs if id(p) not in used]
    for p in passed:  # alpha None has no key to fill: zip stops at the keys
        tensors.update(zip(p.keys, (p.A, p.B, torch.tensor(p.alpha or 0.0, dtype=torch.float64))))
    note = {"source": src.name, "source_format": lora.format, "layout": args.to, "naming": args.naming,
            "qkv_layout": args.layout, "scale": SCALE_NOTE, "passed_through_unmatched": [k for p in passed
                                                                                          for k in p.keys]}
    formats.write(args.dst, tensors, {"format": "pt", "qkv_verify": json.dumps(note)})
    print(f"wrote {args.dst}: {len(plan.updates)} LoRA modules ({args.to}), {len(tensors)} tensors; {SCALE_NOTE}")
    for p in passed:
        print(f"unmatched, copied unchanged: {p.path}")
    return 0


def compare_command(args) -> int:
    """Compare the delta W of two LoRA files module by module: 0 the same within the tolerance, 1 different."""
    from verify.checks import lora_compare as compare
    from verify.files import lora_formats as formats
    from verify.files import lora_mapping as mapping

    refuse_output_file("--json", args.json, {"A": args.a, "B": args.b}, args.force)
    a, b = formats.read(args.a), formats.read(args.b)
    spec = mapping.retarget(_spec(args, [a, b]), "standard")  # compared weight by weight on separate q, k, v
    record = compare.compare(a, b, _plan(a, spec, args), _plan(b, spec, args))
    record["files"] = {"a": str(args.a), "b": str(args.b)}
    if args.json is not None:  # first: the file is written even when a reader of the table goes away (| head)
        _write_text(args.json, json.dumps(_strict(record), indent=2, allow_nan=False))
    print(compare.table(record))
    return 0 if record["same"] else 1


def _strict(value):
    """The record with NaN and Inf as strings, so the JSON is standard."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _write_text(path: Path, text: str) -> None:
    """Write `text` atomically: nothing at `path` unless complete."""
    from verify.files.folder import write_file

    write_file(path, text.encode())
