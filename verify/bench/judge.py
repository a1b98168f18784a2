"""The bench's gate before it times anything: every arm at every size, eager and compiled, outputs and gradients.

Each arm (merged, lean-unfused; their LoRA-training counterparts) runs one training step of the timed module (compiled
or not) and is judged against an fp64 oracle (the standard block's weights in fp64) by verify.checks.compare's
relative-to-base rule, with the standard arm of the same mode, in bf16, as base. Weight gradients are mapped onto the
standard's names (fused projections split by the processor's layout; a fused LoRA adapter's A against the sum of the
separate adapters' A, its B against theirs merged). Calls of the projections are counted by forward hooks attached
before compilation: dynamo traces them and replays their counts, so the count holds under torch.compile too.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from verify.checks.compare import compare
from verify.checks.equivalence import cotangents as seeded_cotangents
from verify.checks.inputs import cast_inputs
from verify.checks.probes import graph_calls, standard_parameters
from verify.checks.runner import counting
from verify.checks.tolerance import GRADIENTS, OUTPUTS
from verify.maths.naming import DEFAULT_NAMING, streams

SEPARATE = tuple(n for s in streams(DEFAULT_NAMING) for n in s.separate)  # to_q ... add_v_proj
ORACLE_HEADS = 1  # heads per chunk of the oracle's attention (its fp64 scores at 16k tokens: 2.2 GB per head)


def cotangents(inputs: dict, seed: int, outputs: dict[str, str]) -> list[torch.Tensor]:
    """The seeded cotangents of the block's outputs (`outputs`: the model's BENCH_OUTPUTS, each output's name -> the
    input of its shape, in the block's order), drawn as every equivalence check draws them
    (verify.checks.equivalence.cotangents), in the inputs' dtype and on their device."""
    streams = {name: inputs[k] for name, k in outputs.items()}
    drawn = seeded_cotangents({k: x.shape for k, x in streams.items()}, seed)
    return [drawn[k].to(x.device, x.dtype) for k, x in streams.items()]


def block_outputs(out, outputs: dict[str, str]) -> dict[str, torch.Tensor]:
    """A block's return value (a tuple of its outputs, or the one) by the names of `outputs`."""
    return dict(zip(outputs, out if isinstance(out, tuple) else (out,), strict=True))


def grad_leaves(inputs: dict, outputs: dict[str, str]) -> dict[str, torch.Tensor]:
    """The input streams of `outputs` as fresh leaves that take a gradient, with the dims a compiled run marked
    dynamic."""
    leaves = {}
    for k in outputs.values():
        leaves[k] = inputs[k].detach().clone().requires_grad_()
        for dim in getattr(inputs[k], "_dynamo_weak_dynamic_indices", ()):
            torch._dynamo.maybe_mark_dynamic(leaves[k], dim)
    return leaves


def train_step(run: nn.Module, module: nn.Module, inputs: dict, seed: int, outputs: dict[str, str],
               ct: list[torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """One forward + backward of `run` (`module`, compiled or not): its outputs, the gradients of the input streams
    of `outputs` and of `module`'s parameters ("input.*", "weight.*"), for the seeded cotangents (or `ct`)."""
    leaves = grad_leaves(inputs, outputs)
    module.zero_grad(set_to_none=True)
    out = block_outputs(run(**{**inputs, **leaves}), outputs)
    ct = cotangents(inputs, seed, outputs) if ct is None else ct
    torch.autograd.backward(tuple(out.values()), [c.to(t.dtype) for c, t in zip(ct, out.values())])
    grads = {f"input.{k}": t.grad for k, t in leaves.items()}
    grads.update({f"weight.{n}": p.grad for n, p in module.named_parameters() if p.grad is not None})
    module.zero_grad(set_to_none=True)
    return {"outputs": {k: t.detach() for k, t in out.items()}, "gradients": grads}


def oracle(std: nn.Module, inputs: dict, seed: int, outputs: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """`std`'s training step in fp64 (its weights upcast, the same inputs and cotangents), attention a head at a
    time (heads_in_chunks): the ground truth of every arm's outputs and gradients."""
    ref = nn.Module.to(copy.deepcopy(std), dtype=torch.float64)  # a LoRA block keeps its base frozen
    wide = cast_inputs(inputs, torch.float64, inputs["hidden_states"].device)
    with heads_in_chunks(ORACLE_HEADS):  # the arms' own cotangents, upcast
        return train_step(ref, ref, wide, seed, outputs, ct=[c.double() for c in cotangents(inputs, seed, outputs)])


@contextlib.contextmanager
def heads_in_chunks(chunk: int) -> Iterator[None]:
    """torch's SDPA computed `chunk` heads at a time, each chunk recomputed in backward (heads are independent: the
    same function). The oracle's fp64 attention runs torch's math kernel, whose (heads, S, S) score matrix at 16k
    image tokens is 53 GB, held again for the backward; a head at a time it is 2.2 GB, held by nothing."""
    sdpa = F.scaled_dot_product_attention

    def chunked(query, key, value, attn_mask=None, **kwargs):
        heads = query.shape[-3] if query.dim() == 4 else 0
        if heads <= chunk:
            return sdpa(query, key, value, attn_mask, **kwargs)
        parts = []
        for i in range(0, heads, chunk):
            part = slice(i, i + chunk)
            mask = attn_mask if attn_mask is None or attn_mask.dim() < 4 or attn_mask.shape[-3] == 1 \
                else attn_mask[:, part]
            parts.append(torch.utils.checkpoint.checkpoint(sdpa, query[:, part], key[:, part], value[:, part], mask,
                                                           use_reentrant=False, **kwargs))
        return torch.cat(parts, dim=1)

    F.scaled_dot_product_attention = chunked
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def fused_lora_gradients(grads: dict[str, torch.Tensor], layout: str, head_dim: int) -> dict[str, torch.Tensor]:
    """A standard LoRA block's gradients under the merged block's names: per stream and attention, the gradient of
    the one fused adapter that computes the three separate ones (its A shared: their A gradients summed; its B:
    theirs merged in `layout`); every other gradient as it is."""
    from verify.maths import qkv

    out = dict(grads)
    for stream in streams(DEFAULT_NAMING):
        pattern = re.compile(rf"^(.*)\.({'|'.join(stream.separate)})\.(lora_[AB]\..*)$")
        groups: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
        for key in grads:
            if m := pattern.match(key):
                groups[m[1], m[3]][m[2]] = key
        for (prefix, rest), keys in groups.items():
            if len(keys) == 3:
                parts = [out.pop(keys[n]) for n in stream.separate]
                out[f"{prefix}.{stream.fused}.{rest}"] = (sum(parts) if rest.startswith("lora_A") else
                                                          qkv.merge(*parts, layout=layout, head_dim=head_dim))
    return out


class Arm:
    """One implementation the bench times, and the calls of the projections that prove which path ran: each
    module whose last name is in `names` must run once per forward, and none in `forbidden` may exist. `layout`:
    that of its fused parameters (None: it has the standard's). `outputs`: the model's BENCH_OUTPUTS. `graphs`:
    what torch.compile captured of it."""

    def __init__(self, name: str, module: nn.Module, names: tuple[str, ...], outputs: dict[str, str],
                 forbidden: tuple[str, ...] = (), layout: str | None = None):
        self.name, self.module, self.names, self.layout, self.outputs = name, module, names, layout, outputs
        leaves = [n.rsplit(".", 1)[-1] for n, _ in module.named_modules()]
        self.targets = sum(leaf in names for leaf in leaves)
        self.extra = sorted({leaf for leaf in leaves if leaf in forbidden})
        self.graphs: list[torch.fx.GraphModule] = []

    def compiled(self, compile_graph: Callable) -> Callable:
        """A torch.compile backend that keeps each graph of this arm, then compiles it with `compile_graph`."""
        def backend(graph, example_inputs):
            self.graphs.append(graph)
            return compile_graph(graph, example_inputs)

        return backend

    def step(self, run: nn.Module, inputs: dict, seed: int) -> tuple[dict, int]:
        """One training step of `run` and the projection calls it made: counted by hooks in eager; compiled, the
        fewest that any graph captured of the arm holds (every graph must call each projection once)."""
        if run is self.module:
            with counting(self.module, self.names) as calls:
                out = train_step(run, self.module, inputs, seed, self.outputs)
            return out, calls()
        out = train_step(run, self.module, inputs, seed, self.outputs)
        return out, min((graph_calls(g, self.names) for g in self.graphs), default=0)


def capturing(backend: str, mode: str | None) -> Callable:
    """The graph compiler of torch.compile's `backend` (inductor with `mode`'s options), for Arm.compiled."""
    if backend != "inductor":
        return torch._dynamo.lookup_backend(backend)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    options = list_mode_options(mode) if mode else {}
    return lambda graph, example_inputs: compile_fx(graph, example_inputs, config_patches=options)


def judge(name: str, arm: Arm, run: nn.Module, ref: dict, base: dict, inputs: dict, seed: int, head_dim: int,
          lora: bool = False) -> list[dict]:
    """arm's outputs and gradients (one training step of `run`, its module compiled or not) vs the fp64 `ref`,
    relative to `base`, with the projection calls of that step counted: other than one per target module, or a
    forbidden module present, fails both records."""
    cand, calls = arm.step(run, inputs, seed)
    gradients, why = _mapped(cand["gradients"], ref["gradients"], arm, head_dim, lora)
    sides = {"ref": ref["gradients"], "base": base["gradients"]}
    if lora and arm.layout:
        sides = {k: fused_lora_gradients(v, arm.layout, head_dim) for k, v in sides.items()}
    if why:
        sides = {k: _inputs_only(v) for k, v in sides.items()}
        gradients = _inputs_only(cand["gradients"])
    records = [compare(f"{name}/outputs", "block", ref["outputs"], cand["outputs"], OUTPUTS, torch.bfloat16,
                       str(inputs["hidden_states"].device), base=base["outputs"], fused_calls=calls),
               compare(f"{name}/gradients", "block", sides["ref"], gradients, GRADIENTS, torch.bfloat16,
                       str(inputs["hidden_states"].device), base=sides["base"], fused_calls=calls)]
    records[1].weight_gradients = f"not compared: {why}" if why else "compared"
    problem = (f"the {arm.name} arm has modules it must not have: {arm.extra}" if arm.extra else
               f"{calls} calls of the {arm.name} arm's projections in one step, expected one per target module "
               f"({arm.targets})" if calls != arm.targets or not arm.targets else None)
    for record in records:
        if problem:
            record.passed, record.message = False, problem
    return [r.to_dict() for r in records]


def _mapped(grads: dict, ref: dict, arm: Arm, head_dim: int, lora: bool) -> tuple[dict, str]:
    """arm's gradients under the standard's names ("" when they map), or why not."""
    if lora or arm.layout is None:  # a LoRA arm is compared under the fused names, a lean arm has the standard's
        return grads, ""
    weights = {k[len("weight."):]: v for k, v in grads.items() if k.startswith("weight.")}
    standard = {k[len("weight."):] for k in ref if k.startswith("weight.")}
    mapped, why = standard_parameters(weights, standard, arm.layout, head_dim)
    if mapped is None:
        return grads, why
    return _inputs_only(grads) | {f"weight.{k}": v for k, v in mapped.items()}, ""


def _inputs_only(grads: dict) -> dict:
    return {k: v for k, v in grads.items() if k.startswith("input.")}
