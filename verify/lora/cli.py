"""The `lora-audit` and `lora-convert` subcommands; bad input raises VerifyError (exit status 2 in verify.cli)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch

from verify.errors import VerifyError
from verify.lora import checkpoint, formats, mapping
from verify.lora.audit import audit, table
from verify.naming import NAMINGS
from verify.qkv import LAYOUTS

OUTPUT_PREFIX = "diffusion_model."  # ComfyUI / ai-toolkit keys with per-module .alpha: widely loadable, scale explicit
SCALE_NOTE = "per-module .alpha keys: multiplier = alpha / rank reproduces the source's trained scale"


def register(subparsers) -> None:
    """Add `lora-audit` and `lora-convert` to the qkv-verify command line."""
    a = subparsers.add_parser(
        "lora-audit", help="say what a LoRA file does to a standard or merged Qwen-Image model",
        description="Exit status: 0 the audit ran (warnings do not fail it), 2 bad input.",
    )
    a.add_argument("lora", type=Path, help="LoRA .safetensors file")
    _model_args(a)
    a.add_argument("--json", type=Path, help="write the audit record here as JSON")
    a.set_defaults(func=audit_command)
    c = subparsers.add_parser(
        "lora-convert", help="convert a LoRA between separate q/k/v and fused QKV, keeping delta W exactly",
        description="Exit status: 0 written, 2 bad input.",
    )
    c.add_argument("src", type=Path, help="LoRA .safetensors file to read")
    c.add_argument("dst", type=Path, help="converted LoRA to write (never SRC; written atomically)")
    c.add_argument("--to", choices=("merged", "standard"), required=True, help="layout of the written LoRA")
    c.add_argument("--naming", choices=tuple(NAMINGS), default="seed",
                   help="fused names with --to merged: seed (to_qkv, add_qkv_proj) or diffusers (to_added_qkv)")
    _model_args(c)
    c.set_defaults(func=convert_command)


def _model_args(p) -> None:
    model = p.add_mutually_exclusive_group()
    model.add_argument("--checkpoint", type=Path,
                       help="diffusers checkpoint folder; only config.json and the tensor headers are read")
    model.add_argument("--config", choices=("tiny", "small", "full"),
                       help="model config built on the meta device (default: full)")
    p.add_argument("--layout", choices=LAYOUTS, default="blocked", help="row layout of fused q/k/v (default: blocked)")
    p.add_argument("--adapter-config", type=Path,
                   help="PEFT adapter_config.json (default: the file's metadata, else adapter_config.json beside it)")


def _spec(args) -> mapping.ModelSpec:
    if args.checkpoint is not None:
        return checkpoint.spec_from_checkpoint(args.checkpoint, args.layout)
    return checkpoint.spec_from_config(args.config or "full", args.layout)


def audit_command(args) -> int:
    """Audit a LoRA file: print a table, optionally write the JSON record; 0 once the audit ran."""
    if args.json is not None and not args.json.parent.is_dir():
        raise VerifyError(f"{args.json.parent}: no such folder for --json")
    lora = formats.read(args.lora, args.adapter_config)
    record = audit(lora, mapping.plan(lora, _spec(args)))
    print(table(record))
    if args.json is not None:
        _write_text(args.json, json.dumps(_strict(record), indent=2, allow_nan=False))
    return 0


def convert_command(args) -> int:
    """Write SRC converted to --to's layout, with each module's scale carried in an .alpha key."""
    if args.dst.exists() and args.src.exists() and args.dst.resolve() == args.src.resolve():
        raise VerifyError(f"{args.dst}: refusing to overwrite the source LoRA")
    if not args.dst.parent.is_dir():
        raise VerifyError(f"{args.dst.parent}: no such folder")
    lora = formats.read(args.src, args.adapter_config)
    spec = _spec(args)
    plan = mapping.plan(lora, mapping.retarget(spec, args.to, args.naming))
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
    note = {"source": args.src.name, "source_format": lora.format, "layout": args.to, "naming": args.naming,
            "qkv_layout": args.layout, "scale": SCALE_NOTE, "passed_through_unmatched": [k for p in passed
                                                                                          for k in p.keys]}
    formats.write(args.dst, tensors, {"format": "pt", "qkv_verify": json.dumps(note)})
    print(f"wrote {args.dst}: {len(plan.updates)} LoRA modules ({args.to}), {len(tensors)} tensors; {SCALE_NOTE}")
    for p in passed:
        print(f"unmatched, copied unchanged: {p.path}")
    return 0


def _strict(value):
    """The record with NaN and Inf as strings, so the JSON is standard."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def _write_text(path: Path, text: str) -> None:
    """Write `text` atomically: nothing at `path` unless complete."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
