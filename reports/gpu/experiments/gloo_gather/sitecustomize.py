"""Experiment only (on PYTHONPATH, every process imports it at start, the spawned ranks too): torch's functional
all_gather_tensor, which crashes gloo with CUDA tensors (gloo-cuda-probe-h200.log), replaced by dist.all_gather,
which does not, so that context parallel's code runs with 2 gloo ranks on one GPU. On NCCL nothing is replaced."""

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def _all_gather_tensor(tensor, gather_dim, group, tag=""):
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=gather_dim)


funcol.all_gather_tensor = _all_gather_tensor
