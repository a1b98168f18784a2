"""`qkv-verify bench`: its arguments and its run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from verify.bench.options import ALL_PHASES, DEFAULT_PROCESSORS, LORA_PHASE, MODES, PHASES, Options
from verify.bench.run import BenchCheckFailed, run_bench
from verify.bench.table import format_table
from verify.errors import VerifyError, run_command
from verify.files.folder import refuse_output_file, same_file, write_file
from verify.models import add_model_argument, choose, load


def _ints(text: str) -> tuple[int, ...]:
    import argparse

    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _choices(allowed: tuple[str, ...]):
    import argparse

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}, got {text!r}")
        return values

    return parse


def register_bench(subparsers) -> None:
    from verify.implementations.fused import PROCESSORS

    p = subparsers.add_parser(
        "bench", help="standard vs merged block speed: forward and training step, eager and torch.compile",
        description="Exit status: 0 measured, 1 the merged block disagreed with the standard one (nothing timed "
                    "after it), 2 bad usage or input.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="where to time (default cuda)")
    p.add_argument("--dim", type=int, help="model width (= heads x head-dim; default: the real model's, 3072 for "
                                            "qwen-image, 4096 for qwen-image-2.1)")
    p.add_argument("--heads", type=int, help="attention heads (default: the real model's, 24 or 32)")
    p.add_argument("--head-dim", type=int, help="size of one head (default: the real model's, 128)")
    p.add_argument("--image-tokens", type=_ints, default=(4096, 8192, 16384), help="comma list of image token counts")
    p.add_argument("--text-tokens", type=int, default=256, help="text tokens in every row (default 256)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--modes", type=_choices(MODES), default=MODES, help="comma list of eager,compiled")
    p.add_argument("--phases", type=_choices(ALL_PHASES), default=PHASES,
                   help=f"comma list of forward,train,{LORA_PHASE} (default forward,train; {LORA_PHASE} needs "
                        "--lora-rank, which adds it)")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help=f"add {LORA_PHASE} rows: a training step of the block with PEFT LoRA adapters of rank R "
                        "(alpha R, bf16) on the write-up's targets (standard and lean-unfused: to_q, to_k, to_v, "
                        "add_q_proj, add_k_proj, add_v_proj, to_out.0, to_add_out; merged: to_qkv, add_qkv_proj, "
                        "to_out.0, to_add_out; qwen-image-2.1: to_q, to_k, to_v or to_qkv, and to_out.0), base "
                        "weights frozen")
    p.add_argument("--processor", choices=tuple(PROCESSORS),
                   help="merged processor (default: fast-compiled on cuda, its region compiled by inductor; "
                        "fast on cpu; qwen-image-2.1 has reference only)")
    p.add_argument("--repeats", type=int, help="timed calls per implementation and row (default 30 on cuda, 3 on cpu)")
    p.add_argument("--warmup", type=int, help="untimed calls first, compilation included (default 5 on cuda, 1 on cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the block's weights and inputs (default 0)")
    p.add_argument("--compile-backend", default="auto",
                   help="torch.compile backend (default: inductor on cuda, eager (graph capture only) on cpu)")
    p.add_argument("--compile-mode", help="torch.compile mode for inductor (default: its default mode)")
    p.add_argument("--compile-shapes", choices=("dynamic", "static"), default="dynamic",
                   help="dynamic: the image sequence length is symbolic, one compilation per implementation and phase "
                        "serves every size (default); static: one compilation per size")
    p.add_argument("--check-tokens", type=int,
                   help="also judge (not time) the arms at N image tokens; every timed size is judged anyway")
    p.add_argument("--full-model", action="store_true",
                   help="also the whole model (--layers blocks) forward, bf16, seeded on the device (~41 GB for "
                        "qwen-image; qwen-image-2.1: no lean-unfused arm, image tokens in multiples of 4)")
    p.add_argument("--layers", type=int, default=60, help="blocks of --full-model (default 60)")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="seconds; past it no new (mode, size) group starts, the JSON lists what was skipped")
    p.add_argument("--json", type=Path, help="write the result as JSON here (rewritten after every row)")
    p.add_argument("--force", action="store_true", help="replace an existing --json FILE (the --append FILE itself "
                                                        "needs none)")
    p.add_argument("--trace", type=Path, metavar="DIR",
                   help="write each row's profiler timeline here, standard and merged (Chrome trace JSON)")
    p.add_argument("--append", type=Path,
                   help="an earlier bench JSON of this device: its rows not measured again are kept in --json")
    add_model_argument(p, "the model benchmarked", reads_checkpoints=False)
    p.set_defaults(func=_bench)


def _bench(args) -> int:
    appending = same_file(args.json, args.append)  # extending that file is what --append asks for
    refuse_output_file("--json", args.json, {}, args.force or appending)
    model = choose(args.model, {})
    full = load(model).model_config("full")
    heads = args.heads or full["num_attention_heads"]
    head_dim = args.head_dim or full["attention_head_dim"]
    phases = args.phases + ((LORA_PHASE,) if args.lora_rank and LORA_PHASE not in args.phases else ())
    opts = Options(model=model, device=args.device, dim=args.dim or heads * head_dim, heads=heads, head_dim=head_dim,
                   image_tokens=args.image_tokens, text_tokens=args.text_tokens, batch=args.batch, modes=args.modes,
                   phases=phases, lora_rank=args.lora_rank,
                   processor=args.processor or DEFAULT_PROCESSORS[model][args.device],
                   repeats=args.repeats or (30 if args.device == "cuda" else 3),
                   warmup=args.warmup or (5 if args.device == "cuda" else 1),
                   seed=args.seed, compile_backend=args.compile_backend, compile_mode=args.compile_mode,
                   compile_shapes=args.compile_shapes,
                   full_model=args.full_model,
                   layers=args.layers, check_tokens=args.check_tokens, time_limit=args.time_limit, trace=args.trace,
                   on_update=lambda result: _write_json(with_previous(previous, result), args.json))
    previous = _read_previous(args.append)
    status = 0
    try:
        result = run_bench(opts)
    except BenchCheckFailed as e:
        result, status = e.result, 1
        print(f"qkv-verify bench: the merged block disagrees with the standard one: {e}", file=sys.stderr)
    result = with_previous(previous, result)
    _write_json(result, args.json)
    print(format_table(result))
    return status


def _read_previous(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VerifyError(f"--append {path}: cannot read a bench JSON: {e}") from None
    if not isinstance(previous, dict) or not isinstance(previous.get("rows"), list):
        raise VerifyError(f"--append {path}: not a qkv-verify bench JSON (no rows)")
    return previous


def with_previous(previous: dict | None, result: dict) -> dict:
    """`result` plus the rows of an earlier run (--append) that this run did not measure again; the earlier run's
    device must be this one, and its peak and config are kept under `appended_from`."""
    if previous is None:
        return result
    if previous.get("device") != result["device"]:
        raise VerifyError(f"--append: measured on {previous.get('device')!r}, not on {result['device']!r}")

    def key(row):
        return row["mode"], row["phase"], row["image_tokens"], row["text_tokens"], row.get("lora_rank")

    merged = dict(result)
    for name in ("rows", "full_model"):
        new = result.get(name) or []
        seen = {key(r) for r in new}
        kept = [r for r in previous.get(name) or [] if key(r) not in seen]
        if kept or new:
            merged[name] = sorted(kept + new, key=lambda r: (MODES.index(r["mode"]), ALL_PHASES.index(r["phase"]),
                                                             r["image_tokens"]))
    merged["checks"] = (previous.get("checks") or []) + result["checks"]
    merged["appended_from"] = {k: previous.get(k) for k in ("matmul_peak_tflops", "config", "torch", "diffusers")}
    return merged


def _write_json(result: dict, path: Path | None) -> None:
    """Write (or rewrite) the result, so that a run cut short still leaves every row it finished."""
    if path is None:
        return
    write_file(path, (json.dumps(result, indent=2, default=_json_default) + "\n").encode())


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def main(argv: list[str] | None = None) -> int:
    """`python -m verify.commands.bench ARGS` = `qkv-verify bench ARGS`, importing only what the bench needs."""
    import argparse

    p = argparse.ArgumentParser(prog="qkv-verify")
    register_bench(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
