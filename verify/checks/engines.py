"""Judging an engine through saved files: the inputs folder of a model's cases (verify.files.saved's layout), and the
judgement of the outputs an engine wrote for it, by the same runner and rule as report's (equivalence.judge_saved)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from verify import __version__, models
from verify.checks.equivalence import judge_saved
from verify.checks.report import environment
from verify.checks.tolerance import DTYPES, dtype_name
from verify.errors import VerifyError
from verify.files import saved
from verify.implementations.candidate import Implementation, resolve


def inputs_files(model: str, config: str, seed: int, components: tuple[str, ...],
                 dtypes: tuple[torch.dtype, ...]) -> dict[str, bytes | str]:
    """Every file of an inputs folder, by relative name: each case of `components` in each dtype."""
    if model != models.DEFAULT_MODEL:
        raise VerifyError(f"inputs --model {model}: not supported yet (inputs handles {models.DEFAULT_MODEL} only)")
    module = models.load(model)
    merged = resolve("reference")
    files: dict[str, bytes | str] = {}
    entries = []
    for name, case in module.CASES.items():
        if case.component not in components:
            continue
        case_config = {**case.config, **{k: module.model_config(config)[k] for k in
                                         ("num_attention_heads", "attention_head_dim", "axes_dims_rope")}}
        standard = case.build(case_config, seed)
        inputs = case.inputs(case_config, case.spec, seed)
        with torch.no_grad():
            shapes = {k: list(v.shape) for k, v in case.outputs(copy.deepcopy(standard), inputs).items()}
        weights = {"standard": f"weights/{name}.standard.safetensors",
                   "merged": f"weights/{name}.merged.safetensors"}
        files[weights["standard"]] = saved.tensor_bytes(standard.state_dict())
        files[weights["merged"]] = saved.tensor_bytes(merged.make(copy.deepcopy(standard), case.component)
                                                      .state_dict())
        for dtype in dtypes:
            tensors, kwargs = saved.encode_call(inputs, dtype)
            inputs_file = f"inputs/{name}.{dtype_name(dtype)}.safetensors"
            files[inputs_file] = saved.tensor_bytes(tensors)
            entries.append({"case": name, "component": case.component, "dtype": dtype_name(dtype),
                            "inputs_file": inputs_file, "kwargs": kwargs, "outputs": shapes, "weights": weights,
                            "config": case_config})
    manifest = {"format": saved.FORMAT, "version": saved.VERSION, "qkv_verify": __version__, "model": model,
                "config": config, "seed": seed, "merged": {"naming": "seed", "layout": "blocked"},
                "entries": entries}
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
    _check_keys(tensors, expected, outputs)
    base_tensors, base_digest = saved.read_outputs(reference_outputs) if reference_outputs else ({}, None)
    _check_keys(base_tensors, expected, reference_outputs)
    module = models.load(manifest["model"])
    engine = resolve(Implementation(f"outputs:{outputs}", lambda standard, component: None, f"outputs:{outputs}",
                                    str(outputs), None, ()), precision=precision)
    ref = resolve(reference or "diffusers")
    records = []
    for name in dict.fromkeys(e["case"] for e in manifest["entries"]):
        entries = [e for e in manifest["entries"] if e["case"] == name]
        case = copy.copy(module.CASES[name])
        case = type(case)(**{**case.__dict__, "config": entries[0]["config"]})
        per_dtype = {DTYPES[e["dtype"]]: _outputs_of(e, tensors) for e in entries}
        bases = {DTYPES[e["dtype"]]: _outputs_of(e, base_tensors) for e in entries} if reference_outputs else None
        records += judge_saved(case, per_dtype, engine, manifest["seed"], ref, bases)
    checks = [r.to_dict() for r in records]
    failed = [c for c in checks if not c["passed"] and c.get("provided", True)]
    absent = sorted({c["name"] for c in checks if not c.get("provided", True)})
    return {
        "verdict": "fail" if failed else "pass", "verdict_reasons": [],
        "compared": (f"{manifest['model']}, outputs {outputs} (sha256 {digest[:16]})"
                     + (f", declared {precision} precision (its fp64 outputs judged at {precision}'s floor)"
                        if engine.precision else "")
                     + f" vs reference {ref.spec}"
                     + (f" (base: outputs {reference_outputs}, sha256 {base_digest[:16]})" if reference_outputs else "")
                     + f"; inputs {inputs} (seeded {manifest['config']} config, seed {manifest['seed']})"),
        "candidate": engine.describe() | {"default": None, "sha256": digest},
        "reference": ref.describe() | {"default": None, "base_outputs": str(reference_outputs) if reference_outputs
                                       else None, "base_sha256": base_digest},
        "checks": checks, "output_stats": [], "output_samples": [], "lora": None, "claims": [], "speed": None,
        "parallel": None, "environment": environment("cpu"),
        "inputs": {"model": manifest["model"], "inputs": str(inputs), "outputs": str(outputs), "sha256": digest,
                   "config": manifest["config"], "seed": manifest["seed"], "qkv_verify": manifest["qkv_verify"]},
        "notes": [f"not provided, not judged: {a}" for a in absent],
    }


def _outputs_of(entry: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """An entry's outputs, or None when the engine wrote none of them (some only: not provided either)."""
    keys = {o: f"{entry['case']}/{entry['dtype']}/{o}" for o in entry["outputs"]}
    if not all(k in tensors for k in keys.values()):
        return None
    return {o: tensors[k] for o, k in keys.items()}


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
