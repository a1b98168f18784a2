"""Experiment: which collective crashes when 2 gloo ranks share one GPU with CUDA tensors (parallel_one_gpu.py's
context-parallel cases died with SIGSEGV, tensor parallel ran). Each probe runs in a fresh pair of ranks, with
faulthandler on, and prints ok or dies.

Usage (GPU machine, repository root on PYTHONPATH): PYTHONFAULTHANDLER=1 python3 gloo_cuda_probe.py
"""

from __future__ import annotations

import sys
import tempfile

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh


def _probe(rank: int, init: str, name: str) -> None:
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    x = torch.arange(8.0, device="cuda") + rank
    if name == "all_gather":
        out = [torch.empty_like(x) for _ in range(2)]
        dist.all_gather(out, x)
    elif name == "all_gather(bool)":
        out = [torch.empty_like(x > 3) for _ in range(2)]
        dist.all_gather(out, x > 3)
    elif name == "funcol.all_gather_tensor":
        funcol.all_gather_tensor(x, gather_dim=0, group=dist.group.WORLD).wait()
    elif name == "funcol.all_to_all_single":
        funcol.all_to_all_single(x, None, None, dist.group.WORLD).wait()
    elif name == "mesh(1,2).all_to_all_single":
        mesh = init_device_mesh("cuda", (1, 2), mesh_dim_names=("ring", "ulysses"))
        funcol.all_to_all_single(x, None, None, mesh["ulysses"].get_group()).wait()
    elif name == "mesh(2,1).all_gather_tensor":
        mesh = init_device_mesh("cuda", (2, 1), mesh_dim_names=("ring", "ulysses"))
        funcol.all_gather_tensor(x, gather_dim=0, group=mesh["ring"].get_group()).wait()
    torch.cuda.synchronize()
    dist.barrier()
    print(f"{name}: rank {rank} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    for name in sys.argv[1:] or ["all_gather", "all_gather(bool)", "funcol.all_gather_tensor",
                                 "funcol.all_to_all_single", "mesh(1,2).all_to_all_single",
                                 "mesh(2,1).all_gather_tensor"]:
        try:
            mp.spawn(_probe, args=(tempfile.mktemp(), name), nprocs=2)
        except Exception as error:  # an experiment: say which probe died and go on
            print(f"{name}: {type(error).__name__}: {error}", flush=True)
