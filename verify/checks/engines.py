"""Judging an engine through saved files: the inputs folder of a model's cases (verify.files.saved's layout), and the
judgement of the outputs an engine wrote for it, by the same runner and rule as report's (equivalence.judge_saved)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from verify import __version__, models
from verify.checks.equivalence import cotangents, grad_inputs, judge_saved
from verify.checks.probes import submodule_outputs
from verify.checks.report import environment, reference_precision
from verify.checks.runner import build_component
from verify.checks.tolerance import DTYPES, dtype_name
from verify.errors import VerifyError
from verify.files import saved
from verify.implementations.candidate import Implementation, resolve, resolve_reference

# How an entry's outputs come from the component, by the case's outputs function: one call with the manifest's
# keyword arguments, or a protocol of several calls spelled out for the engine's author. A case whose outputs come
# from anything else is left out of the manifest, with the reason.
ONE_CALL = ("attention_outputs", "block_outputs", "model_outputs")
PROTOCOLS = {
    "cached_attention_outputs": {
        "protocol": "kv-cache", "not_arguments": ["next_target"],
        "how": "The keyword arguments but next_target are this step's prefill call over [prefix, target] (P prefix "
               "tokens, T = next_target's tokens). 'prefill': the last T rows of the call with hidden_states = "
               "[hidden_states[:, :P], next_target], the other arguments unchanged. 'cached': your KV-cached decode "
               "of next_target: this step's call storing the K and V (after QK-norm and RoPE) of its first P tokens, "
               "then next_target alone (rotary_emb[P:]) attending over [stored K and V, its own], padded keys "
               "(key_valid False) never attended (diffusers: kv_cache_mode 'extract' with cache_write_slice "
               "slice(0, P), then 'cached').",
    },
    "cached_model_outputs": {
        "protocol": "kv-cache", "not_arguments": ["next_target", "next_timestep"],
        "how": "The keyword arguments but next_target and next_timestep are this step's call (P prefix tokens of "
               "hidden_states, T = next_target's tokens). 'prefill': the last T rows of the sample of the call with "
               "hidden_states = [hidden_states[:, :P], next_target] and timestep = next_timestep. 'cached': the "
               "same call's sample computed from each layer's K and V of the prefix stored by this step's call "
               "(diffusers: a QwenImage21KVCache, kv_cache_mode 'extract' at this step, then 'cached').",
    },
}


def fixture_of(module, case) -> str:
    """The name of the model's fixture (its FIXTURES) that `case` runs on."""
    return next((name for name, spec in module.FIXTURES.items() if spec == case.spec), "(own)")


def call_of(case) -> tuple[dict | None, str]:
    """(the manifest's "call" of `case`, "") or (None, why the manifest cannot express it)."""
    name = getattr(case.outputs, "__name__", repr(case.outputs))
    if name in ONE_CALL:
        return {"protocol": "one call"}, ""
    if name in PROTOCOLS:
        return PROTOCOLS[name], ""
    return None, f"its outputs come from {name}, a sequence of calls the manifest has no words for"


def inputs_files(model: str, config: str, seed: int, components: tuple[str, ...],
                 dtypes: tuple[torch.dtype, ...], fixtures: tuple[str, ...] | None = None) -> dict[str, bytes | str]:
    """Every file of an inputs folder, by relative name: each case of `components` on `fixtures` (default all the
    model's) in each dtype."""
    module = models.load(model)
    unknown = [f for f in fixtures or () if f not in module.FIXTURES]
    if unknown:
        raise VerifyError(f"--fixture {unknown[0]}: no fixture of {model}; expected one of "
                          f"{', '.join(module.FIXTURES)}")
    merged = resolve("reference")
    files: dict[str, bytes | str] = {}
    entries, left_out = [], []
    for name, case in module.CASES.items():
        fixture = fixture_of(module, case)
        if case.component not in components or (fixtures and fixture not in fixtures):
            continue
        call, why = call_of(case)
        if call is None:
            left_out.append({"case": name, "component": case.component, "fixture": fixture, "reason": why})
            continue
        case_config = {**case.config, **{k: module.model_config(config)[k] for k in
                                         ("num_attention_heads", "attention_head_dim", "axes_dims_rope")}}
        standard = case.build(case_config, seed)
        inputs = case.inputs(case_config, case.spec, seed)
        run = copy.deepcopy(standard)
        with torch.no_grad(), submodule_outputs(run) as seen:
            shapes = {k: list(v.shape) for k, v in case.outputs(run, inputs).items()}
        modules = {name if call == 1 else f"{name} (call {call})": [list(t.shape) for t in tensors]
                   for (name, call), tensors in seen.items() if tensors}  # the standard's execution order
        cots = cotangents(shapes, seed) if case.grads else {}
        weights = {"standard": f"weights/{name}.standard.safetensors",
                   "merged": f"weights/{name}.merged.safetensors"}
        files[weights["standard"]] = saved.tensor_bytes(standard.state_dict())
        files[weights["merged"]] = saved.tensor_bytes(build_component(merged, copy.deepcopy(standard), case.component)
                                                      .state_dict())
        for dtype in dtypes:
            tensors, kwargs = saved.encode_call(inputs, dtype)
            inputs_file = f"inputs/{name}.{dtype_name(dtype)}.safetensors"
            files[inputs_file] = saved.tensor_bytes(tensors | {f"cotangent.{k}": c.to(dtype) for k, c in cots.items()})
            entries.append({"case": name, "component": case.component, "fixture": fixture,
                            "dtype": dtype_name(dtype), "inputs_file": inputs_file, "call": call, "kwargs": kwargs,
                            "outputs": shapes, "modules": modules, "weights": weights, "config": case_config}
                           | ({"gradients": {"cotangents": {k: f"cotangent.{k}" for k in cots},
                                             "inputs": {k: list(inputs[k].shape) for k in grad_inputs(inputs)}}}
                              if cots else {}))
    if not entries:
        raise VerifyError(f"inputs --model {model}: --component {', '.join(components)} with --fixture "
                          f"{', '.join(fixtures or module.FIXTURES)} selects no case of {model}"
                          + (f" the manifest can express ({left_out[0]['case']}: {left_out[0]['reason']})"
                             if left_out else ""))
    manifest = {"format": saved.FORMAT, "version": saved.VERSION, "qkv_verify": __version__, "model": model,
                "config": config, "seed": seed, "merged": {"naming": "seed", "layout": "blocked"},
                "entries": entries, "left_out": left_out}
    return files | {saved.MANIFEST: json.dumps(manifest, indent=2) + "\n", "README.txt": saved.README}


def judge_folder(outputs: Path, inputs: Path, reference: str | None = None, precision: str | None = None,
                 reference_outputs: Path | None = None) -> dict:
    """summary.json's content for the outputs an engine wrote for the inputs folder `inputs`; `precision="fp32"`
    declares that the engine computes in fp32 at best (its fp64 outputs judged at fp32's floor); `reference_outputs`
    (outputs saved in the same format, e.g. by `report --save-outputs` on another machine) replace the reference run
    here as base; the oracle is still computed here."""
    manifest = saved.read_manifest(inputs)
    tensors, digest = saved.read_outputs(outputs)
    expected = {f"{e['case']}/{e['dtype']}/{o}": e["outputs"][o] for e in manifest["entries"] for o in e["outputs"]}
    expected |= {f"{e['case']}/{e['dtype']}/grad/{k}": shape for e in manifest["entries"]
                 for k, shape in e.get("gradients", {}).get("inputs", {}).items()}
    expected |= {f"{e['case']}/{e['dtype']}/module/{name}/{i}": shape for e in manifest["entries"]
                 for name, shapes in e.get("modules", {}).items() for i, shape in enumerate(shapes)}
    _check_keys(tensors, expected, outputs)
    if not any(f"{e['case']}/{e['dtype']}/{o}" in tensors for e in manifest["entries"] for o in e["outputs"]):
        raise VerifyError(f"OUTPUTS {outputs}: holds no output of the manifest's {len(manifest['entries'])} entries "
                          f"(keys <case>/<dtype>/<output>, e.g. {next(iter(expected), 'none')}): nothing to judge")
    base_tensors, base_digest = saved.read_outputs(reference_outputs) if reference_outputs else ({}, None)
    _check_keys(base_tensors, expected, reference_outputs)
    module = models.load(manifest["model"])
    unknown = [e["case"] for e in manifest["entries"] if e["case"] not in module.CASES]
    if unknown:
        raise VerifyError(f"--inputs {inputs}: the manifest's case {unknown[0]} is no case of {manifest['model']} "
                          f"in this qkv-verify (write the inputs again with this version)")
    engine = resolve(Implementation(f"outputs:{outputs}", lambda standard, component: None, f"outputs:{outputs}",
                                    str(outputs), None, ()), precision=precision)
    ref = resolve_reference(reference, module.REFERENCE_PRECISION)
    records = []
    for name in dict.fromkeys(e["case"] for e in manifest["entries"]):
        entries = [e for e in manifest["entries"] if e["case"] == name]
        case = copy.copy(module.CASES[name])
        case = type(case)(**{**case.__dict__, "config": entries[0]["config"]})
        per_dtype = {DTYPES[e["dtype"]]: _outputs_of(e, tensors) for e in entries}
        bases = {DTYPES[e["dtype"]]: _outputs_of(e, base_tensors) for e in entries} if reference_outputs else None
        grads = {DTYPES[e["dtype"]]: _gradients_of(e, tensors) for e in entries}
        base_grads = {DTYPES[e["dtype"]]: _gradients_of(e, base_tensors) for e in entries} if reference_outputs \
            else None
        modules = {DTYPES[e["dtype"]]: _modules_of(e, tensors) for e in entries}
        records += judge_saved(case, per_dtype, engine, manifest["seed"], ref, bases, grads, base_grads, modules)
    checks = [r.to_dict() for r in records]
    failed = [c for c in checks if not c["passed"] and c.get("provided", True)]
    absent = sorted({c["name"] for c in checks if not c.get("provided", True)})
    return {
        "verdict": "fail" if failed else "pass", "verdict_reasons": [],
        "compared": (f"{manifest['model']}, outputs {outputs} (sha256 {digest[:16]})"
                     + (f", declared {precision} precision (its fp64 outputs judged at {precision}'s floor)"
                        if engine.precision else "")
                     + f" vs reference {ref.spec}{reference_precision(manifest['model'], ref.describe())}"
                     + (f" (base: outputs {reference_outputs}, sha256 {base_digest[:16]})" if reference_outputs else "")
                     + f"; inputs {inputs} (seeded {manifest['config']} config, seed {manifest['seed']})"),
        "candidate": engine.describe() | {"default": None, "sha256": digest},
        "reference": ref.describe() | {"default": None, "base_outputs": str(reference_outputs) if reference_outputs
                                       else None, "base_sha256": base_digest},
        "checks": checks, "output_stats": [], "output_samples": [], "lora": None, "claims": [], "speed": None,
        "parallel": None, "environment": environment("cpu"),
        "inputs": {"model": manifest["model"], "inputs": str(inputs), "outputs": str(outputs), "sha256": digest,
                   "config": manifest["config"], "seed": manifest["seed"], "qkv_verify": manifest["qkv_verify"]},
        "notes": [f"not provided, not judged: {a}" for a in absent]
                 + [f"left out of the inputs, not judged: {o['case']} ({o['reason']})"
                    for o in manifest.get("left_out", [])],
    }


def _outputs_of(entry: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """An entry's outputs, or None when the engine wrote none of them (some only: not provided either)."""
    keys = {o: f"{entry['case']}/{entry['dtype']}/{o}" for o in entry["outputs"]}
    if not all(k in tensors for k in keys.values()):
        return None
    return {o: tensors[k] for o, k in keys.items()}


def _gradients_of(entry: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The input gradients an entry's engine wrote, by input name (judge_saved records those it lacks as not
    compared), or None when it wrote none."""
    keys = {k: f"{entry['case']}/{entry['dtype']}/grad/{k}" for k in entry.get("gradients", {}).get("inputs", {})}
    return {name: tensors[k] for name, k in keys.items() if k in tensors} or None


def _modules_of(entry: dict, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]] | None:
    """The submodule outputs an engine wrote for an entry, by the standard's module name (those it wrote whole)."""
    prefix = f"{entry['case']}/{entry['dtype']}/module/"
    found = {name: tuple(tensors.get(f"{prefix}{name}/{i}") for i in range(len(shapes)))
             for name, shapes in entry.get("modules", {}).items()}
    return {name: ts for name, ts in found.items() if all(t is not None for t in ts)} or None


def _check_keys(tensors: dict[str, torch.Tensor], expected: dict[str, list[int]], outputs: Path) -> None:
    """Refuse what cannot be judged: a key the manifest does not expect, a shape it does not give, a NaN-only
    tensor."""
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise VerifyError(f"OUTPUTS {outputs}: {extra[0]} is no entry of the manifest (expected keys "
                          "<case>/<dtype>/<output>, e.g. " + next(iter(expected), "none") + ")")
    for key, tensor in tensors.items():
        if list(tensor.shape) != expected[key]:
            raise VerifyError(f"OUTPUTS {outputs}: {key} has shape {list(tensor.shape)}, the manifest expects "
                              f"{expected[key]}")
        if tensor.is_floating_point() and tensor.numel() and bool(tensor.isnan().all()):
            raise VerifyError(f"OUTPUTS {outputs}: {key} is NaN everywhere: not an output")
