"""Presentation of `qkv-verify sample`: summary.json, report.md and a self-contained index.html with the error
against the oracle per step (base and cand, log scale) and the final images side by side with a difference heatmap
(charts drawn headless, as verify.present.charts draws them)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from verify.files.folder import write_folder
from verify.present.charts import COLORS, png

TRAJECTORY_COLUMNS = ["name", "dtype", "passed", "max_abs_err", "base_max_abs_err", "ratio", "tolerance",
                      "fused_calls", "first_divergence"]
IMAGE_COLUMNS = ["dtype", "implementation", "psnr_db", "ssim", "pixel_mean", "max_abs_pixel_err"]
CLAIM_COLUMNS = ["dtype", "standard_mean", "merged_mean", "standard_psnr_db", "merged_psnr_db"]
LORA_COLUMNS = ["factor", "effect_mean_abs", "deviation_mean_abs", "effect_over_deviation"]


def write_sample(summary: dict, pictures: dict[str, dict[str, np.ndarray]], out: Path) -> None:
    """Every file of a sampling run into `out`, none half-written: `pictures` are the final images per dtype."""
    pngs = {"trajectory.png": png(trajectory_chart(summary)), "images.png": png(images_chart(pictures))}
    files = {"summary.json": json.dumps(summary, indent=2, allow_nan=False) + "\n", "report.md": markdown(summary),
             "index.html": html(summary, pngs), **pngs}
    write_folder(out, files)


def trajectory_chart(summary: dict):
    """Max |latents - oracle| after each step, base (standard) and cand (merged), one panel per dtype."""
    rows = pd.DataFrame(summary["trajectory"])
    dtypes = list(dict.fromkeys(rows["dtype"]))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(3.2 * len(dtypes), 2.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        part = rows[rows["dtype"] == dtype]
        steps = range(1, len(part) + 1)
        for column, role in (("base_max_abs_err", "standard"), ("max_abs_err", "merged")):
            values = part[column].astype(float).clip(lower=1e-18)  # an exact step drawn at the floor of the axis
            ax.plot(steps, values, marker=".", color=COLORS[role], label=role)
        ax.set_yscale("log")
        ax.set_title(dtype)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("max |latents - oracle|")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def images_chart(pictures: dict[str, dict[str, np.ndarray]]):
    """Per dtype: the oracle's, base's and cand's final image, and |cand - oracle| as a heatmap."""
    fig, axes = plt.subplots(len(pictures), 4, figsize=(8, 2.2 * len(pictures)), squeeze=False)
    for row, (dtype, images) in zip(axes, pictures.items()):
        for ax, role in zip(row, ("oracle", "standard", "merged")):
            ax.imshow(np.clip(images[role], 0, 1))
            ax.set_title(f"{role} ({dtype})" if role != "oracle" else "oracle (fp64)", fontsize=8)
        diff = np.abs(images["merged"] - images["oracle"]).max(axis=-1) * 255
        shown = row[3].imshow(diff, cmap="magma")
        row[3].set_title("|merged - oracle| x 255", fontsize=8)
        fig.colorbar(shown, ax=row[3], fraction=0.046)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def markdown(summary: dict) -> str:
    lines = [f"# qkv-verify sample: **{summary['verdict'].upper()}**", "", f"Compared: {summary['compared']}.", ""]
    lines += [f"- {note}" for note in summary["notes"]] + ([""] if summary["notes"] else [])
    failed = [r for r in summary["trajectory"] if not r["passed"]]
    if failed:
        lines += ["## First failing step per dtype", "", _table([r for r in failed if r["first_divergence"]],
                                                               TRAJECTORY_COLUMNS), ""]
    lines += ["## Claims", ""] + [f"- {c['claim']}: **{c['verdict']}**: {c['why']}" for c in summary["claims"]]
    lines += ["", _table([r for c in summary["claims"] for r in c["measured"]], CLAIM_COLUMNS), ""]
    lines += ["## Final images against the oracle's", "", _table(summary["images"], IMAGE_COLUMNS), ""]
    if lora := summary.get("lora"):
        lines += ["## LoRA effect against the merged path's deviation (fp32, grey levels)", "",
                  _table(lora["sweep"], LORA_COLUMNS), ""]
    lines += ["## Trajectory", "", _table(summary["trajectory"], TRAJECTORY_COLUMNS), ""]
    lines += ["## Sampling", "", "```json", json.dumps(summary["sampling"], indent=2), "```", ""]
    return "\n".join(lines)


def html(summary: dict, pngs: dict[str, bytes]) -> str:
    env = Environment(loader=PackageLoader("verify", "present/templates"), autoescape=select_autoescape())
    frame = {name: pd.DataFrame(rows).reindex(columns=columns).to_html(
        index=False, float_format=lambda x: f"{x:.4g}", na_rep="", classes="table", border=0)
        for name, rows, columns in (("trajectory", summary["trajectory"], TRAJECTORY_COLUMNS),
                                    ("images", summary["images"], IMAGE_COLUMNS),
                                    ("claims", [r for c in summary["claims"] for r in c["measured"]], CLAIM_COLUMNS),
                                    ("lora", (summary.get("lora") or {}).get("sweep", []), LORA_COLUMNS))}
    images = {name: "data:image/png;base64," + base64.b64encode(data).decode() for name, data in pngs.items()}
    return env.get_template("sample.html.j2").render(summary=summary, tables=frame, images=images,
                                                    sampling=json.dumps(summary["sampling"], indent=2))


def _table(rows: list[dict], columns: list[str]) -> str:
    return pd.DataFrame(rows).reindex(columns=columns).to_markdown(index=False, floatfmt=".4g")
