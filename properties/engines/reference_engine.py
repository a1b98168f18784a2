"""qkv-verify's built-in `reference` processor as an engine in another process: reads INPUTS_DIR, writes OUTPUTS
(the round trip of inputs -> engine -> judge, which must give report --candidate reference's records). Usage:
python reference_engine.py INPUTS_DIR OUTPUTS [SPEC]; SPEC, another candidate (e.g. a planted bug,
verify.planted:cache_k_v_swapped_21), run in place of the reference processor. Any model the manifest names."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
    with torch.no_grad():
        result = case.outputs(module, decode_call(entry["kwargs"], load_file(inputs / entry["inputs_file"])))
    outputs |= {f"{entry['case']}/{entry['dtype']}/{name}": t.contiguous() for name, t in result.items()}
save_file(outputs, sys.argv[2])
