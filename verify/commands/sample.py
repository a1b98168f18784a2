"""`qkv-verify sample`: a sampling run of diffusers' pipeline judged step by step against an fp64 oracle."""

from __future__ import annotations

import argparse
from pathlib import Path

from verify.commands.report import _dtypes
from verify.models import add_model_argument, choose, load

FIXTURES = ("text-to-image", "edit", "edit-2511", "edit-adjacent")


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HxW in pixels, e.g. 32x32") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be positive")
    return height, width


def _steps(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number of steps")
    return int(text)


def register_sample(subparsers) -> None:
    from verify.maths.qkv import LAYOUTS

    p = subparsers.add_parser(
        "sample", description="Runs diffusers' own pipeline three times from the same seeded noise, prompt "
                              "embeddings (a padded negative prompt for true CFG) and scheduler: the oracle "
                              "(the reference in fp64, its scheduler step in fp64), base (the reference in each "
                              "dtype) and cand (the candidate in each dtype), and judges the latents after every "
                              "step by the relative-to-base rule; the final latents are decoded by one fp64 VAE "
                              "(PSNR, SSIM and the pixel mean against the oracle's image). Exit status: 0 every "
                              "step passed, 1 otherwise, 2 bad usage or input.")
    add_model_argument(p)
    p.add_argument("--candidate", metavar="SPEC", help="the implementation judged (as report's; default: the "
                                                       "processor fuse_model installs on --device)")
    p.add_argument("--reference", metavar="SPEC", help="what it must match (default: diffusers' standard model)")
    p.add_argument("--fused-modules", metavar="NAMES", help="as report's: names whose calls prove the fused path ran, "
                                                            "or none")
    p.add_argument("--candidate-precision", choices=("fp64", "fp32"), help="as report's")
    p.add_argument("--layout", choices=LAYOUTS, default="blocked",
                   help="layout of --merged-checkpoint's fused tensors (never guessed from the weights)")
    p.add_argument("--checkpoint", type=Path, metavar="DIR",
                   help="a diffusers transformer folder (config.json + safetensors, sharded or not): the standard "
                        "weights, their config.json naming the model; loaded whole unless --stream, so the fp64 "
                        "oracle holds the model in fp64 (8 bytes a parameter: about 160 GB for Qwen-Image) beside a "
                        "copy in each run's dtype")
    p.add_argument("--merged-checkpoint", type=Path, metavar="DIR",
                   help="your merged weights (with --checkpoint): checked to split, in --layout, into "
                        "--checkpoint's bit for bit (as report's); the candidate is built from them split back, "
                        "loaded whole in fp64 too")
    p.add_argument("--lora", type=Path, help="a LoRA file (safetensors, any format lora-audit reads): its effect on "
                                             "the final image at each factor of report's sweep beside the merged "
                                             "path's own deviation (fp32), in summary.json's lora")
    p.add_argument("--vae", type=Path, metavar="DIR",
                   help="a diffusers VAE folder of the model's class (AutoencoderKLQwenImage, AutoencoderKLQwenImage21 "
                        "for qwen-image-2.1) that decodes every run in fp64 (default: a seeded tiny one)")
    p.add_argument("--config", choices=("tiny", "small", "full"), default="tiny",
                   help="seeded-weights config when no --checkpoint is given (default tiny); full is the real width, "
                        "its weights generated per tensor on --device and always streamed (--stream)")
    p.add_argument("--stream", action="store_true",
                   help="hold one block's weights at a time in every run, the fp64 oracle included (which then runs "
                        "on --device): each block is read (or generated) and built again before each model call, so "
                        "no model, and no checkpoint, is ever whole in memory; slower, the same numbers")
    p.add_argument("--fixture", choices=FIXTURES, default=FIXTURES[0],
                   help="what is sampled: text-to-image (default); edit, a seeded condition image "
                        "(QwenImageEditPipeline, or QwenImage21Pipeline with the image's slots in the prompt "
                        "embeddings); edit-2511 (qwen-image only: QwenImageEditPlusPipeline, the model's zero_cond_t "
                        "on, as Qwen-Image-Edit-2511); edit-adjacent (qwen-image-2.1 only: two condition images whose "
                        "slots sit side by side, two image blocks)")
    p.add_argument("--size", type=_size, help="HxW in pixels, each a multiple of 8 for qwen-image (default 32x32), "
                                              "of 32 for qwen-image-2.1 (default 64x64)")
    p.add_argument("--steps", type=_steps, default=20, help="sampling steps (default 20)")
    p.add_argument("--true-cfg-scale", type=float, help="true CFG scale (default 4.0 for qwen-image, 1.0 for "
                                                        "qwen-image-2.1, as their pipelines); above 1 runs the "
                                                        "negative prompt too")
    p.add_argument("--dtypes", type=_dtypes, default=_dtypes("fp64,fp32,bf16,fp16"),
                   help="comma list of fp64,fp32,bf16,fp16 (fp64 and fp32 are always run)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where base and cand run (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, noise and embeddings (default 0)")
    p.add_argument("--out", type=Path, default=Path("qkv-verify-sample"),
                   help="output folder: new, empty, or an earlier qkv-verify output (default qkv-verify-sample)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out that is not an earlier output")
    p.set_defaults(func=_sample)


def _sample(args) -> int:
    import torch

    from verify.checks.report import REQUIRED_DTYPES, default_candidate, environment
    from verify.checks.sampling import SampleOptions, mean_claim, run_sampling
    from verify.commands.report import _refuse_foreign_out, _refuse_writing_into_inputs
    from verify.errors import VerifyError
    from verify.files.checkpoint import Checkpoint
    from verify.implementations.candidate import resolve, resolve_reference
    from verify.present.sample import write_sample

    checkpoints = {flag: path for flag, path in (("--checkpoint", args.checkpoint),
                                                 ("--merged-checkpoint", args.merged_checkpoint)) if path}
    model = choose(args.model, {f"{flag} {path}": Checkpoint(path).config for flag, path in checkpoints.items()})
    if args.device == "cuda" and not torch.cuda.is_available():
        raise VerifyError("--device cuda: no CUDA device is available")
    spec = args.candidate.rpartition(":")[0] if args.candidate else ""
    _refuse_writing_into_inputs(args.out, ({"--candidate": Path(spec)} if spec.endswith(".py") else {})
                                | ({"--lora": args.lora} if args.lora else {}) | checkpoints
                                | ({"--vae": args.vae} if args.vae else {}))
    _refuse_foreign_out(args.out, args.force)
    candidate = resolve(args.candidate or default_candidate(model, args.device), args.fused_modules,
                        args.candidate_precision)
    reference = resolve_reference(args.reference, load(model).REFERENCE_PRECISION)
    dtypes = tuple(dict.fromkeys([*REQUIRED_DTYPES, *args.dtypes]))
    opts = SampleOptions(model=model, config=args.config, fixture=args.fixture, steps=args.steps,
                         true_cfg_scale=args.true_cfg_scale, size=args.size, dtypes=dtypes, device=args.device,
                         seed=args.seed, lora=args.lora, checkpoint=args.checkpoint,
                         merged_checkpoint=args.merged_checkpoint, layout=args.layout, vae=args.vae,
                         stream=args.stream)
    result, pictures = run_sampling(candidate, reference, opts)
    failed = [r for r in result["trajectory"] if not r["passed"]]
    unequal = [r for r in result["weights"] if not r["passed"]]  # a checkpoint's NaN, merged weights not the standard
    summary = {"verdict": "fail" if failed or unequal else "pass", "compared": "", "notes": _notes(result, candidate),
               "candidate": candidate.describe(), "reference": reference.describe(), **result,
               "claims": [mean_claim(result)],
               "environment": environment(args.device)}
    summary["compared"] = compared_line(summary)
    write_sample(summary, pictures, args.out)
    print(summary["compared"])
    print(f"verdict: {summary['verdict']} ({len(result['trajectory']) - len(failed)}/{len(result['trajectory'])} "
          f"steps passed); report in {args.out}/index.html")
    for r in (r for r in failed if r["first_divergence"]):
        print(f"  FAILED from {r['name']} [{r['dtype']}]: {r['message']}; first divergence: {r['first_divergence']}")
    for r in unequal:
        print(f"  FAILED {r['name']}: {r['message']}")
    return 0 if summary["verdict"] == "pass" else 1


def compared_line(summary: dict) -> str:
    """What was sampled (the user's checkpoint, merged checkpoint and VAE named when given), with what, and where
    cand first left the bound."""
    from verify.checks.report import reference_precision

    s, cand = summary["sampling"], summary["candidate"]
    weights = f"checkpoint {s['checkpoint']}" if s.get("checkpoint") else f"seeded {s['config']} config"
    if s.get("merged_checkpoint"):
        weights += f", merged weights {s['merged_checkpoint']} ({s['layout']})"
    line = (f"{s['model']}, {s['pipeline']} ({s['fixture']}) {s['steps']} steps at {s['size'][0]}x{s['size'][1]}, "
            f"true CFG {s['true_cfg_scale']:g}: candidate {cand['spec']} vs reference {summary['reference']['spec']}"
            f"{reference_precision(s['model'], summary['reference'])}; "
            f"{weights} (seed {s['seed']}){'; VAE ' + s['vae_folder'] if 'vae_folder' in s else ''}; dtypes "
            f"{','.join(dict.fromkeys(r['dtype'] for r in summary['trajectory']))}")
    line += f"; LoRA {summary['lora']['file']} swept over {len(summary['lora']['sweep'])} factors" \
        if summary.get("lora") else ""
    line += f"; streamed block by block, the oracle on {s['oracle_device']}" if s.get("streamed") else ""
    line += f"; {s['stand_in']}" if s.get("stand_in") else ""  # where the pipeline is not run as it stands
    first = next((r for r in summary["trajectory"] if r["first_divergence"]), None)
    return line + (f"; first divergence [{first['dtype']}]: {first['first_divergence']}" if first else "")


def _notes(result: dict, candidate) -> list[str]:
    """What the images show beside the verdict: the pixel means side by side (an equal mean is no evidence)."""
    by = {(i["dtype"], i["implementation"]): i for i in result["images"]}
    notes = [f"pixel mean: oracle {by[('fp64', 'oracle')]['pixel_mean']:.2f}, "
             + ", ".join(f"{d} standard {by[(d, 'standard')]['pixel_mean']:.2f} / merged "
                         f"{by[(d, 'merged')]['pixel_mean']:.2f}" for d, role in by if role == "merged")]
    notes += [f"{r['name']}: {'' if r['passed'] else 'FAILED: '}{r['message']}" for r in result["weights"]]
    if not candidate.fused:
        notes.append(f"candidate {candidate.spec} is declared unfused: no fused-call proof")
    final = {r["dtype"]: r for r in result["final"]}
    notes += [f"{r['dtype']}: merged/standard error ratio {_ratio(r)} in one forward pass (step 1's first call), "
              f"{_ratio(final[r['dtype']])} after the last step" for r in result["single_pass"]]
    if lora := result.get("lora"):
        at_one = next(r for r in lora["sweep"] if r["factor"] == 1.0)
        ratio = at_one["effect_over_deviation"]
        notes.append(f"LoRA {lora['file']} at its own scale moves the fp32 image by {at_one['effect_mean_abs']:.3g} "
                     f"grey levels on average, the merged path deviates by {at_one['deviation_mean_abs']:.3g}: "
                     + ("the LoRA's effect is " + (f"{ratio:.3g}x the merged path's deviation" if ratio is not None
                                                   else "all that differs (the merged path is exact)")))
    return notes


def _ratio(record: dict) -> str:
    if record["ratio"] is not None:
        return f"{record['ratio']:.3g}"
    return "0 (both exact)" if record["max_abs_err"] == 0 else "undefined (standard exact)"
