"""Benchmark of `qkv-verify convert` at the real width (not a test): throughput against a plain copy, peak memory
against the streaming bound.

    python reports/convert/bench_convert.py [--blocks 5] [--shard-mb 900] [--repeats 2] [--dir /tmp]

Builds a synthetic standard checkpoint in a temporary folder (deleted at the end, never committed): the real
architecture's names and shapes (dim 3072, 24 x 128 heads, bf16) with `--blocks` blocks (about 0.68 GB each),
written in diffusers' sharded layout with an index; block 1's to_v sits in the last shard, so its q, k and v are
read across shards. Each measurement runs in its own subprocess, which reports its own peak RSS (getrusage). Printed:
convert throughput / copy throughput (goal >= 0.5; copy = shutil.copyfile of the same files), and peak RSS / bound
with bound = largest shard + one q/k/v group + 300 MB (goal <= 1), for --to merged and for --to standard.
Also printed: CPU seconds per GB (user + system) of each run, a figure that does not depend on what else the
machine is running, and the load average, which does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128, num_attention_heads=24,
            joint_attention_dim=3584, axes_dims_rope=[16, 56, 56])
WEIGHTS = "diffusion_pytorch_model"
SLACK = 300 * 2**20


def build(folder: Path, blocks: int, shard_bytes: int) -> dict:
    """The synthetic checkpoint; returns its facts (shards, sizes, the cross-shard group)."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import save_file

    config = dict(FULL, num_layers=blocks)
    with torch.device("meta"):
        shapes = {k: tuple(p.shape) for k, p in QwenImageTransformer2DModel(**config).named_parameters()}
    late = [k for k in shapes if k.startswith("transformer_blocks.1.attn.to_v.")]
    order = [k for k in shapes if k not in late] + late
    shards, current, size = [], [], 0
    for key in order:
        nbytes = 2 * _numel(shapes[key])
        if current and size + nbytes > shard_bytes and key not in late:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    n = len(shards)
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    for i, keys in enumerate(shards, 1):
        name = f"{WEIGHTS}-{i:05d}-of-{n:05d}.safetensors"
        sd = {k: torch.randn(shapes[k], generator=g, dtype=torch.float32).to(torch.bfloat16) for k in keys}
        save_file(sd, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        del sd
    total = sum(2 * _numel(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / f"{WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps({"_class_name": "QwenImageTransformer2DModel", **config}))
    split = sorted({weight_map[f"transformer_blocks.1.attn.{x}.weight"] for x in ("to_q", "to_k", "to_v")})
    assert len(split) > 1, "block 1's q, k, v must sit in different shards"
    dim = FULL["num_attention_heads"] * FULL["attention_head_dim"]
    return {"shards": n, "largest_shard": max(p.stat().st_size for p in folder.glob("*.safetensors")),
            "bytes": sum(p.stat().st_size for p in folder.iterdir()), "group": 3 * 2 * dim * (dim + 1),
            "cross_shard_group": f"transformer_blocks.1.attn.to_q/k/v in {', '.join(split)}"}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def child(args: list[str]) -> None:
    """Run one measured operation; print seconds and this process's peak RSS as JSON.

    Peak RSS is the kernel's VmHWM, which starts afresh at exec; getrusage's ru_maxrss is printed as well, but Linux
    carries it over from the parent through fork and exec, so it is only an upper bound.
    """
    what, src, dst = args[0], Path(args[1]), Path(args[2])
    if what == "build":
        print(json.dumps(build(dst, int(args[3]), int(args[4]))))
        return
    base = 0
    if what == "convert":
        from verify.files.convert import convert
        base = _status("VmRSS")  # the interpreter and its libraries: 0.39 GB with CPU torch, 0.84 GB with CUDA torch
        cpu0 = _cpu()
        start = time.perf_counter()
        convert(src, dst, args[3], layout=args[4])
    else:
        cpu0 = _cpu()
        start = time.perf_counter()
        dst.mkdir()
        for f in sorted(src.iterdir()):
            shutil.copyfile(f, dst / f.name)
            if what == "copy+fsync":
                fd = os.open(dst / f.name, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "max_rss": _status("VmHWM"), "base_rss": base, "cpu": _cpu() - cpu0,
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    return next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(f"{field}:"))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(*argv) -> dict:
    os.sync()  # every run starts with no dirty pages of an earlier one waiting to reach the disk
    time.sleep(2)
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, argv)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    if out.returncode:
        raise SystemExit(f"child {argv[0]} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--shard-mb", type=int, default=900)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layout", default="blocked")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-convert-", dir=a.dir) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        facts = measure("build", tmp, tmp / "std", a.blocks, a.shard_mb * 2**20)
        gb = facts["bytes"] / 1e9
        print(f"checkpoint: {gb:.2f} GB in {facts['shards']} shards (largest {facts['largest_shard'] / 1e9:.2f} GB), "
              f"{facts['cross_shard_group']}; built in {time.perf_counter() - t0:.0f} s")
        bound = facts["largest_shard"] + facts["group"] + SLACK
        runs: dict[str, list[dict]] = {}
        merged = tmp / "merged"
        for r in range(a.repeats):
            for name, argv in (("copy", ("copy", tmp / "std", tmp / "copy")),
                               ("copy+fsync", ("copy+fsync", tmp / "std", tmp / "copy")),
                               ("to merged", ("convert", tmp / "std", merged, "merged", a.layout)),
                               ("to standard", ("convert", merged, tmp / "back", "standard", a.layout))):
                m = measure(*argv)
                print(f"  run {r + 1} {name:12s} {gb / m['seconds']:.3f} GB/s  {m['cpu'] / gb:.2f} CPU s/GB  "
                      f"peak RSS {m['max_rss'] / 2**20:.0f} MB  (load {os.getloadavg()[0]:.1f})")
                runs.setdefault(name, []).append(m)
                shutil.rmtree(tmp / ("copy" if "copy" in name else "back"), ignore_errors=True)
                if name == "to standard" and r + 1 < a.repeats:
                    shutil.rmtree(merged)
        rate = {name: [gb / m["seconds"] for m in ms] for name, ms in runs.items()}
        copy = max(max(rate["copy"]), max(rate["copy+fsync"]))  # the faster copy: the harder baseline
        print(f"bound = largest shard + one q/k/v group + 300 MB = {bound / 2**20:.0f} MB")
        for name in ("copy", "copy+fsync"):
            cpu = statistics.median(m["cpu"] for m in runs[name]) / gb
            print(f"  {name:11s} best {max(rate[name]):.3f} GB/s, median {statistics.median(rate[name]):.3f}; "
                  f"{cpu:.2f} CPU s/GB")
        print(f"  baseline = the faster copy's best = {copy:.3f} GB/s")
        for name in ("to merged", "to standard"):
            best, median = max(rate[name]), statistics.median(rate[name])
            rss = max(m["max_rss"] for m in runs[name])
            base = min(m["base_rss"] for m in runs[name])
            cpu = statistics.median(m["cpu"] for m in runs[name]) / gb
            print(f"  {name:11s} best {best:.3f} GB/s, median {median:.3f}; {cpu:.2f} CPU s/GB; ratio to copy+fsync "
                  f"{best / max(rate['copy+fsync']):.2f}")
            print(f"  {name:11s} throughput ratio {best / copy:.2f} "
                  f"(median {median / copy:.2f}; goal >= 0.5)  peak RSS {rss / 2**20:.0f} MB: RSS ratio "
                  f"{rss / bound:.2f} (goal <= 1)")
            print(f"  {name:11s} after imports {base / 2**20:.0f} MB; above that {(rss - base) / 2**20:.0f} MB = "
                  f"{(rss - base) / (bound - SLACK):.2f} of largest shard + one q/k/v group")


if __name__ == "__main__":
    main()
