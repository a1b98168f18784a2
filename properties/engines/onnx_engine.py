"""The merged attention exported with torch.onnx.export and run by ONNX Runtime (another runtime, other kernels),
on qkv-verify's saved inputs. RoPE is applied as cos/sin (ONNX has no complex numbers).
Usage: python onnx_engine.py INPUTS_DIR OUTPUTS.safetensors"""
import json
import sys
import tempfile
from pathlib import Path

import onnxruntime
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def rms_norm(x, weight, eps=1e-6):  # as diffusers' RMSNorm: the variance in fp32
    return x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, cos, sin):  # the complex rotation (x0 + i x1)(cos + i sin), on pairs, in fp32
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).type_as(x)


class MergedAttention(torch.nn.Module):
    def __init__(self, weights):
        super().__init__()
        for k, v in weights.items():
            self.register_buffer(k.replace(".", "_"), v)

    def forward(self, hidden, text, mask, img_cos, img_sin, txt_cos, txt_sin):
        head_dim = self.norm_q_weight.shape[0]
        streams = []
        for x, fused, nq, nk, cos, sin in ((text, "add_qkv_proj", "norm_added_q", "norm_added_k", txt_cos, txt_sin),
                                           (hidden, "to_qkv", "norm_q", "norm_k", img_cos, img_sin)):
            q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in
                       F.linear(x, getattr(self, f"{fused}_weight"), getattr(self, f"{fused}_bias")).chunk(3, -1))
            q = rope(rms_norm(q, getattr(self, f"{nq}_weight")), cos, sin)
            k = rope(rms_norm(k, getattr(self, f"{nk}_weight")), cos, sin)
            streams.append((q, k, v))
        q, k, v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in zip(*streams))
        keep = torch.cat([mask.bool(), torch.ones(hidden.shape[:2], dtype=torch.bool)], 1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).flatten(2)
        n = text.shape[1]
        return (F.linear(out[:, n:], self.to_out_0_weight, self.to_out_0_bias),
                F.linear(out[:, :n], self.to_add_out_weight, self.to_add_out_bias))


inputs, outputs = Path(sys.argv[1]), {}
for entry in json.loads((inputs / "manifest.json").read_text())["entries"]:
    if entry["component"] != "attention" or entry["dtype"] not in ("fp32", "fp64"):
        continue  # the attention in fp32 and fp64: the other entries are "not provided"
    t = load_file(inputs / entry["inputs_file"])
    dtype = t["hidden_states"].dtype
    model = MergedAttention({k: v.to(dtype) for k, v in load_file(inputs / entry["weights"]["merged"]).items()})
    args = (t["hidden_states"], t["encoder_hidden_states"], t["encoder_hidden_states_mask"].float(),
            *(t[f"image_rotary_emb.{i}"][..., j].contiguous() for i in (0, 1) for j in (0, 1)))
    with tempfile.TemporaryDirectory() as tmp:
        torch.onnx.export(model, args, f"{tmp}/attention.onnx", dynamo=True, verbose=False)
        session = onnxruntime.InferenceSession(f"{tmp}/attention.onnx", providers=["CPUExecutionProvider"])
        image, text = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})
    outputs[f"{entry['case']}/{entry['dtype']}/image"] = torch.from_numpy(image)
    outputs[f"{entry['case']}/{entry['dtype']}/text"] = torch.from_numpy(text)
save_file(outputs, sys.argv[2])
