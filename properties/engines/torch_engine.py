"""A merged-QKV Qwen-Image joint attention in plain torch (no diffusers, no qkv-verify): one fused projection per
stream, run on qkv-verify's saved inputs (and, where the manifest gives cotangents, the input gradients by autograd;
the outputs of its steps that stand for the standard's submodules, norm_q to to_add_out, under their names).
Usage: python torch_engine.py INPUTS_DIR OUTPUTS.safetensors"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def rms_norm(x, weight, eps=1e-6):  # as diffusers' RMSNorm: the variance in fp32
    x = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)
    return x.to(weight.dtype) * weight if weight.dtype in (torch.float16, torch.bfloat16) else x * weight


def rope(x, freqs):  # as diffusers' apply_rotary_emb_qwen: the rotation in fp32 complex
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(1)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


def attention(w, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, image_rotary_emb, seen=None):
    """The outputs by name; `seen` receives the outputs of the steps that stand for the standard's submodules."""
    seen = {} if seen is None else seen
    head_dim = w["norm_q.weight"].shape[0]
    streams = []
    for x, fused, nq, nk in ((encoder_hidden_states, "add_qkv_proj", "norm_added_q", "norm_added_k"),
                             (hidden_states, "to_qkv", "norm_q", "norm_k")):
        q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in
                   F.linear(x, w[f"{fused}.weight"], w[f"{fused}.bias"]).chunk(3, dim=-1))  # blocked [q | k | v]
        seen[nq], seen[nk] = rms_norm(q, w[f"{nq}.weight"]), rms_norm(k, w[f"{nk}.weight"])
        streams.append((seen[nq], seen[nk], v))
    (tq, tk, tv), (iq, ik, iv) = streams
    img_freqs, txt_freqs = image_rotary_emb
    tq, tk, iq, ik = rope(tq, txt_freqs), rope(tk, txt_freqs), rope(iq, img_freqs), rope(ik, img_freqs)
    q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in ((tq, iq), (tk, ik), (tv, iv)))
    mask = torch.cat([encoder_hidden_states_mask.bool(), torch.ones(hidden_states.shape[:2], dtype=torch.bool)], 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]).transpose(1, 2).flatten(2)
    text = encoder_hidden_states.shape[1]
    seen["to_out.0"] = F.linear(out[:, text:], w["to_out.0.weight"], w["to_out.0.bias"])
    seen["to_add_out"] = F.linear(out[:, :text], w["to_add_out.weight"], w["to_add_out.bias"])
    return {"image": seen["to_out.0"], "text": seen["to_add_out"]}


def value(spec, tensors):
    if "tensor" in spec:
        t = tensors[spec["tensor"]]
        return torch.view_as_complex(t) if spec.get("complex") else t
    return tuple(value(s, tensors) for s in spec["tuple"]) if "tuple" in spec else spec["value"]


inputs, outputs = Path(sys.argv[1]), {}
for entry in json.loads((inputs / "manifest.json").read_text())["entries"]:
    if entry["component"] != "attention":
        continue  # this engine implements the attention only: the other entries are "not provided"
    tensors = load_file(inputs / entry["inputs_file"])
    dtype = tensors["hidden_states"].dtype
    weights = {k: t.to(dtype) for k, t in load_file(inputs / entry["weights"]["merged"]).items()}
    kwargs = {k: value(s, tensors) for k, s in entry["kwargs"].items()}
    seen = {}
    with torch.no_grad():
        result = attention(weights, seen=seen, **kwargs)
    outputs |= {f"{entry['case']}/{entry['dtype']}/{name}": t.contiguous() for name, t in result.items()}
    # optional: the outputs of the steps that stand for the standard's submodules, under their names
    outputs |= {f"{entry['case']}/{entry['dtype']}/module/{name}/0": t.clone() for name, t in seen.items()
                if name in entry.get("modules", {})}
    if "gradients" in entry:  # optional: the input gradients of sum(output * cotangent), by autograd
        leaves = {k: kwargs[k].clone().requires_grad_() for k in entry["gradients"]["inputs"]}
        result = attention(weights, **kwargs | leaves)
        sum((result[o] * tensors[key]).sum() for o, key in entry["gradients"]["cotangents"].items()).backward()
        outputs |= {f"{entry['case']}/{entry['dtype']}/grad/{k}": t.grad.contiguous() for k, t in leaves.items()}
save_file(outputs, sys.argv[2])
assert not any(m == "verify" or m.startswith(("verify.", "diffusers")) for m in sys.modules), "not an outside engine"
