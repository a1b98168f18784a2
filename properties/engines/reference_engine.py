"""qkv-verify's built-in `reference` processor as an engine in another process: reads INPUTS_DIR, writes OUTPUTS
(the round trip of inputs -> engine -> judge, which must give report --candidate reference's records). Usage:
python reference_engine.py INPUTS_DIR OUTPUTS [SPEC]; SPEC, another candidate (e.g. a planted bug,
verify.planted:cache_k_v_swapped_21), run in place of the reference processor. Any model the manifest names. It also
writes the input gradients of the manifest's cotangents and the outputs of the submodules the manifest lists (those
its module has, under their names, in the shapes listed)."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from verify.checks.probes import submodule_outputs
from verify.checks.tolerance import DTYPES
from verify.files.saved import decode_call
from verify.implementations.candidate import resolve
from verify.models import load

inputs, outputs = Path(sys.argv[1]), {}
manifest = json.loads((inputs / "manifest.json").read_text())
model, reference = load(manifest["model"]), resolve(sys.argv[3] if len(sys.argv) > 3 else "reference")
for entry in manifest["entries"]:
    case = model.CASES[entry["case"]]
    standard = case.build(entry["config"], manifest["seed"])
    standard.load_state_dict(load_file(inputs / entry["weights"]["standard"]))
    module = reference.make(torch.nn.Module.to(standard, DTYPES[entry["dtype"]]), entry["component"])
    tensors = load_file(inputs / entry["inputs_file"])
    kwargs = decode_call(entry["kwargs"], tensors)
    with torch.no_grad(), submodule_outputs(module) as seen:
        result = case.outputs(module, kwargs)
    outputs |= {f"{entry['case']}/{entry['dtype']}/{name}": t.contiguous() for name, t in result.items()}
    for (name, call), found in seen.items():  # under the standard's names, where shapes agree
        key = name if call == 1 else f"{name} (call {call})"
        if entry.get("modules", {}).get(key) == [list(t.shape) for t in found]:
            outputs |= {f"{entry['case']}/{entry['dtype']}/module/{key}/{i}": t.clone() for i, t in enumerate(found)}
    if "gradients" in entry:  # the input gradients of sum(output * cotangent), by autograd
        leaves = {k: kwargs[k].clone().requires_grad_() for k in entry["gradients"]["inputs"]}
        result = case.outputs(module, kwargs | leaves)
        sum((result[o] * tensors[key]).sum() for o, key in entry["gradients"]["cotangents"].items()).backward()
        outputs |= {f"{entry['case']}/{entry['dtype']}/grad/{k}": t.grad.contiguous() for k, t in leaves.items()}
save_file(outputs, sys.argv[2])
