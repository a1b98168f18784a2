"""Measure where fp64 verdicts must draw the line: how far correct reorderings of fp64 arithmetic land from the fp64
oracle (diffusers' standard component), and how far fp32 arithmetic lands, outputs and gradients, tiny to full width.

For each implementation, case, width and seed it records the smallest floor f that would pass it with torch.testing's
form of bound, |cand - ref| <= f + f * |ref| (atol = rtol = f), over every output and gradient tensor. Writes JSON
(`--out`) with every row and, per implementation, the largest and smallest f over the draws.

    PYTHONPATH=. python reports/precision/fp64_floor.py --out reports/precision/fp64-floor-cpu.json \
        --widths "tiny 4x16,8x64"                                      # this 2-core CPU, about 3 minutes
    PYTHONPATH=. python reports/precision/fp64_floor.py --device cuda --out fp64-floor-h100.json   # every width
    PYTHONPATH=. python reports/precision/fp64_floor.py --device cuda --widths "full 24x128" --cases block \
        --seeds 3 --out reports/precision/fp64-floor-full-width-block-h100.json

The H100 run of every width was cut at the device's 540 s limit after the full-width attention draws: its rows, as
printed, are reports/precision/fp64-floor-h100.log, gathered by `write` into fp64-floor-h100.json; the full-width
blocks ran separately.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from properties.precision_variants import ExplicitSoftmax, Fp32Attention, RopeInInputDtype, build_with
from verify.checks.equivalence import _run, implementation
from verify.checks.inputs import cast_inputs
from verify.checks.runner import build_component
from verify.implementations.fused import FusedQwenAttnProcessor
from verify.models.qwen_image import CASES, InputSpec, model_config

WIDTHS = {  # (heads, head dim, rope axes), image grid and text length
    "tiny 4x16": (dict(num_attention_heads=4, attention_head_dim=16, axes_dims_rope=(8, 4, 4)), InputSpec()),
    "8x64": (dict(num_attention_heads=8, attention_head_dim=64, axes_dims_rope=(16, 24, 24)),
             InputSpec(height=8, width=8, text_len=24, pad=(0, 7))),
    "full 24x128": (dict(num_attention_heads=24, attention_head_dim=128, axes_dims_rope=(16, 56, 56)),
                    InputSpec(batch=1, height=16, width=16, text_len=64, pad=(13,))),
}


IMPLEMENTATIONS = {
    "reference": ("fp64 reordering", "reference"),
    "fast": ("fp64 reordering", "fast"),
    "interleaved": ("fp64 reordering", build_with(FusedQwenAttnProcessor, "interleaved")),
    "explicit-softmax": ("fp64 reordering", build_with(ExplicitSoftmax)),
    "explicit-softmax-interleaved": ("fp64 reordering", build_with(ExplicitSoftmax, "interleaved")),
    "diffsynth (attention)": ("fp64 reordering", "diffsynth"),
    "rope-in-fp64": ("fp64 rotation, where diffusers rotates in fp32", build_with(RopeInInputDtype)),
    "fp32-attention": ("fp32 arithmetic", build_with(Fp32Attention)),
    "fp32-attention-interleaved": ("fp32 arithmetic", build_with(Fp32Attention, "interleaved")),
}


def needed_floor(ref: dict, cand: dict) -> tuple[float, str]:
    """max |c - r| / (1 + |r|) over every tensor, and the tensor where it is reached."""
    worst, where = 0.0, ""
    for kind in ref:
        for key, r in ref[kind].items():
            c = cand[kind].get(key)
            if c is None:
                continue
            f = float(((c.double() - r.double()).abs() / (1 + r.double().abs())).max())
            if f > worst:
                worst, where = f, f"{kind}.{key}"
    return worst, where


def measure(name: str, spec, case_name: str, width: str, seed: int, device: str) -> dict | None:
    case = CASES[case_name]
    overrides, inputs_spec = WIDTHS[width]
    config = model_config("tiny", **overrides)
    standard = case.build(config, seed).to(device)
    inputs = cast_inputs(case.inputs(config, inputs_spec, seed), torch.float64, device)
    impl = implementation(spec)
    diffusers = implementation("diffusers")
    ref_module = build_component(diffusers, standard, case.component)
    cand_module = build_component(impl, case.build(config, seed).to(device), case.component)
    if cand_module is None:
        return None
    ref = _run(case, ref_module, inputs, True, seed)
    cand = _run(case, cand_module, inputs, True, seed)
    ref["gradients"] = {k: v for k, v in ref["gradients"].items() if k.startswith("input.")}
    f, where = needed_floor(ref, cand)
    return {"implementation": name, "case": case_name, "width": width, "seed": seed, "floor_needed": f,
            "where": where, "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--widths", default=",".join(WIDTHS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", default="attention,block")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for width in args.widths.split(","):
        for case_name in args.cases.split(","):
            for name, (kind, spec) in IMPLEMENTATIONS.items():
                if name.startswith("diffsynth") and case_name != "attention":
                    continue  # DiffSynth's block has another MLP activation: not a reordering
                for seed in range(args.seeds):
                    row = measure(name, spec, case_name, width, seed, args.device)
                    if row:
                        rows.append({**row, "kind": kind})
                        print(json.dumps(rows[-1]), flush=True)
                        write(args, rows)  # after every draw: a run cut short leaves what it measured


def write(args, rows: list[dict]) -> None:
    summary = {}
    for name, (kind, _) in IMPLEMENTATIONS.items():
        values = [r["floor_needed"] for r in rows if r["implementation"] == name]
        if values:
            summary[name] = {"kind": kind, "max": max(values), "min": min(values), "draws": len(values)}
    with open(args.out, "w") as f:
        card = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
        json.dump({"machine": card, "device": args.device, "torch": torch.__version__,
                   "form": "floor_needed = max |cand - ref| / (1 + |ref|) over outputs and input gradients (fp64)",
                   "summary": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
