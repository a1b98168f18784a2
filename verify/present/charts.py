"""PNG charts of a report, drawn from the recorded summary only (Agg backend, fixed sizes, no timestamps)."""

from __future__ import annotations

import io
import re
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DTYPE_ORDER = ["fp64", "fp32", "bf16", "fp16"]
COLORS = {"standard": "#4c72b0", "merged": "#dd8452", "oracle": "#55a868"}


def charts(summary: dict) -> dict[str, bytes]:
    """File name -> PNG bytes for every chart the summary has data for."""
    out = {"errors.png": png(errors_chart(summary))}
    if summary.get("output_stats"):  # from the streamed model's fixtures (Qwen-Image)
        out["output_stats.png"] = png(stats_chart(summary))
    if summary.get("lora"):
        out["lora_counts.png"] = png(lora_counts_chart(summary["lora"]))
        out["alpha_sweep.png"] = png(sweep_chart(summary["lora"]))
    if summary.get("speed") and summary["speed"].get("rows"):
        out["speed.png"] = png(speed_chart(summary["speed"]))
    return out


def errors_chart(summary: dict):
    """Max |output - fp64 oracle| per dtype, standard and merged side by side, one panel per check group: the
    model's, else (a judge of an engine's attention or block outputs) every judged one."""
    judged = [c for c in summary["checks"] if c.get("provided", True) and c["max_abs_err"] is not None]
    groups = sorted({c["name"] for c in judged if c["component"] == "model"}) or sorted({c["name"] for c in judged})
    if not groups:
        fig = plt.figure(figsize=(4.5, 1))
        fig.text(0.5, 0.5, "no output was judged", ha="center", va="center")
        return fig
    fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
    for ax, name in zip(axes[0], groups):
        rows = sorted((c for c in summary["checks"] if c["name"] == name), key=lambda c: DTYPE_ORDER.index(c["dtype"]))
        x = range(len(rows))
        for offset, impl, key in ((-0.2, "standard", "base_max_abs_err"), (0.2, "merged", "max_abs_err")):
            values = [c[key] or 0.0 for c in rows]
            ax.bar([i + offset for i in x], [v if v > 0 else float("nan") for v in values], 0.4,
                   label=impl, color=COLORS[impl])
            for i, v in zip(x, values):
                if v == 0:
                    ax.text(i + offset, 1e-17, "exact", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(list(x), [c["dtype"] for c in rows])
        ax.set_yscale("log")
        ax.set_ylim(1e-17, max([1.0] + [3 * (c[k] or 0.0) for c in rows for k in ("base_max_abs_err", "max_abs_err")]))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("dtype")
        ax.set_ylabel("max |output − fp64 oracle| (output units)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle("Error against the fp64 oracle: standard vs merged")
    fig.tight_layout()
    return fig


def stats_chart(summary: dict):
    """Output distributions (p1-p99 whiskers, p5-p95 box, median, mean) of oracle, standard and merged."""
    fixtures = list(dict.fromkeys(s["fixture"] for s in summary["output_stats"]))
    fig, axes = plt.subplots(1, len(fixtures), figsize=(6 * len(fixtures), 4), squeeze=False)
    for ax, fixture in zip(axes[0], fixtures):
        rows = [s for s in summary["output_stats"] if s["fixture"] == fixture and s["mean"] is not None]
        if not rows:
            ax.text(0.5, 0.5, "no finite output values", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(f"{fixture}: output distribution", fontsize=10)
            continue
        stats = [{"label": f"{s['dtype']}\n{s['implementation']}", "med": s["p50"], "q1": s["p5"], "q3": s["p95"],
                  "whislo": s["p1"], "whishi": s["p99"], "mean": s["mean"], "fliers": []} for s in rows]
        boxes = ax.bxp(stats, showmeans=True, patch_artist=True)
        for patch, s in zip(boxes["boxes"], rows):
            patch.set_facecolor(COLORS[s["implementation"]])
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"{fixture}: output distribution", fontsize=10)
        ax.set_ylabel("output value")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Output statistics (box p5–p95, whiskers p1–p99, triangle = mean)")
    fig.tight_layout()
    return fig


def lora_counts_chart(lora: dict):
    """LoRA modules of the file that landed, per module type and per block."""
    sources = [s for m in lora["modules"] for s in m["sources"]]
    kinds = Counter(re.sub(r"^.*transformer_blocks\.\d+\.", "", s) for s in sources)
    blocks = Counter(int(m.group(1)) for s in sources if (m := re.search(r"transformer_blocks\.(\d+)\.", s)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.barh(list(kinds), list(kinds.values()), color=COLORS["merged"])
    a.set_xlabel("LoRA modules (A/B pairs) matched")
    a.set_title("per module type", fontsize=10)
    b.bar(list(blocks), list(blocks.values()), color=COLORS["standard"])
    b.set_xlabel("block index")
    b.set_ylabel("LoRA modules (A/B pairs) matched")
    b.set_title("per block", fontsize=10)
    fig.suptitle(f"LoRA: {lora['modules_matched']} modules, {lora['tensors']} tensors matched; "
                 f"{len(lora['unmatched_keys'])} unmatched")
    fig.tight_layout()
    return fig


def sweep_chart(lora: dict):
    """Deviation from the base model output as the multiplier grows; the audited scale marked."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = lora["sweep"]
    x = [r["factor"] for r in rows]
    for impl in ("oracle", "standard", "merged"):
        ax.plot(x, [r[f"{impl}_rel_dev"] for r in rows], marker="o", label=impl, color=COLORS[impl],
                linestyle="--" if impl == "merged" else "-")
    ax.axvline(1.0, color="gray", linestyle=":")
    scale = lora["scale"]["value"]
    ax.text(1.0, 0.95, f" audited scale m = {scale:g}" if scale is not None else " audited scale (modules disagree)",
            fontsize=8, transform=ax.get_xaxis_transform())
    ax.set_xscale("symlog", linthresh=0.25)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlim(-0.02, max(x) * 1.3)
    ax.set_ylim(0, None)
    ax.set_xlabel("multiplier, in units of the audited scale")
    ax.set_ylabel("‖output − base output‖ / ‖base output‖")
    ax.set_title("LoRA alpha sweep (fp32; oracle fp64)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def speed_chart(bench: dict):
    """Merged speed relative to standard (standard_ms / merged_ms) per mode and phase, by image tokens."""
    rows = bench["rows"]
    series = sorted({(r["mode"], r["phase"]) for r in rows})
    tokens = sorted({r["image_tokens"] for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for j, (mode, phase) in enumerate(series):
        by_tokens = {r["image_tokens"]: r for r in rows if (r["mode"], r["phase"]) == (mode, phase)}
        picked = [by_tokens.get(t) for t in tokens]
        ax.bar([i + j * width for i in range(len(tokens))], [r["speedup"] if r else float("nan") for r in picked],
               width, yerr=_interval_bars(picked), capsize=2, label=f"{mode} {phase}")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tokens))], [str(t) for t in tokens])
    ax.set_xlabel("image tokens (text tokens fixed)")
    ax.set_ylabel("speedup: standard ms / merged ms (bars: 95% CI)")
    ax.set_title(f"Merged vs standard block on {bench.get('device', '?')} (bf16)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _interval_bars(rows: list[dict | None]) -> list[list[float]]:
    """matplotlib's (below, above) error bars of each row's speedup from its 95% CI (none where it has none)."""
    below, above = [], []
    for r in rows:
        speed = r["speedup"] if r else 0.0
        low, high = (r.get("speedup_ci") or (speed, speed)) if r else (0.0, 0.0)
        below.append(max(0.0, speed - low))
        above.append(max(0.0, high - speed))
    return [below, above]


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()
