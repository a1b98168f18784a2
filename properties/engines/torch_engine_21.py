"""A merged-QKV Qwen-Image 2.1 transformer in plain torch (no diffusers, no qkv-verify), as an engine author would
write it from the manifest: one fused to_qkv ([q | k | v] rows), QK RMSNorm over head_dim, complex RoPE, the
block-causal mask (the manifest's element mask; the model builds its own from img_shapes), padded text keys never
attended, SwiGLU MLP, one shared modulation, and the prefix KV cache (extract, then cached). Every entry of the
manifest: attention, block and model, the kv-cache ones included; the input gradients of the manifest's cotangents
by autograd; the outputs of its steps that stand for the standard's submodules, under their names.
Usage: python torch_engine_21.py INPUTS_DIR OUTPUTS.safetensors [--plant BUG]; BUG, a bug planted on purpose for
tests: full-attention (the block-causal mask replaced by the padding mask alone), cache-k-v-swapped (the decode reads
the cached K as V and V as K)."""
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

PLANTS = ("full-attention", "cache-k-v-swapped")
plant = sys.argv[sys.argv.index("--plant") + 1] if "--plant" in sys.argv else None
assert plant in (None, *PLANTS), f"--plant {plant}: one of {', '.join(PLANTS)}"
EPS = 1e-6  # the config's eps (diffusers' default), every norm of the model


def rms_norm(x, weight):  # as diffusers' RMSNorm: the variance, and so the scale, in fp32
    x = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + EPS)
    return x.to(weight.dtype) * weight if weight.dtype in (torch.float16, torch.bfloat16) else x * weight


def rope(x, freqs):  # (B, S, H, D) rotated by freqs (S, D/2), complex, in fp32 as diffusers' apply_rotary_emb_qwen
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(1)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


def record(seen, name, t):  # the output of a step that stands for the standard's submodule `name`
    if seen is not None:
        seen[name] = t
    return t


def attention(w, x, freqs, mask, seen=None, cache=None, mode=None):
    """x (B, S, dim); mask: bool, broadcast to (B, H, S, S + cached); cache: a dict, the prefix's K and V (after
    QK-norm and RoPE), stored by mode "extract" (of the first cache["length"] tokens) and read by mode "cached"."""
    head_dim = w["norm_q.weight"].shape[0]
    qkv = F.linear(x, w["to_qkv.weight"])  # (B, S, 3 * inner): blocked [q | k | v]
    q, k, v = (record(seen, name, t) for name, t in zip(("to_q", "to_k", "to_v"), qkv.chunk(3, dim=-1)))
    q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))  # (B, S, H, D)
    q = record(seen, "norm_q", rms_norm(q, w["norm_q.weight"])).to(v.dtype)
    k = record(seen, "norm_k", rms_norm(k, w["norm_k.weight"])).to(v.dtype)
    q, k = rope(q, freqs), rope(k, freqs)
    if mode == "extract":
        cache["k"], cache["v"] = k[:, :cache["length"]].clone(), v[:, :cache["length"]].clone()
    elif mode == "cached":
        cached_k, cached_v = (cache["v"], cache["k"]) if plant == "cache-k-v-swapped" else (cache["k"], cache["v"])
        k, v = torch.cat([cached_k, k], dim=1), torch.cat([cached_v, v], dim=1)
    if plant == "full-attention" and mode != "cached":  # every query attends to every key some query attends to
        mask = mask.any(dim=-2, keepdim=True)  # (the valid ones)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    out = record(seen, "to_out.0", F.linear(out.transpose(1, 2).flatten(2), w["to_out.0.weight"]))
    return record(seen, "to_out.1", out)  # to_out.1: diffusers' Dropout(0.0)


def rows(params, target_token_mask):
    """Per-sample modulation over the token axis; with causal_condition (B + 1 rows) the target image's tokens read
    their sample's row, the text and condition tokens the last (t = 0) row."""
    if target_token_mask is None:
        return params.unsqueeze(1)
    return torch.where(target_token_mask.view(1, -1, 1), params[:-1].unsqueeze(1), params[-1:].unsqueeze(0))


def block(w, x, modulation, freqs, mask, target_token_mask, seen=None, cache=None, mode=None):
    """One block: modulated LayerNorm, attention, tanh gate; modulated LayerNorm, SwiGLU MLP, tanh gate."""
    sub = {} if seen is not None else None
    attn_w = {k.removeprefix("attn."): t for k, t in w.items() if k.startswith("attn.")}
    (scale1, gate1), (scale2, gate2) = (
        (rows(p, target_token_mask) for p in mod.chunk(2, dim=-1)) for mod in modulation.chunk(2, dim=-1))
    h = record(sub, "img_norm1", F.layer_norm(x, x.shape[-1:], eps=EPS)) * (1 + scale1)
    attn_seen = {} if seen is not None else None
    a = attention(attn_w, h, freqs, mask, attn_seen, cache, mode)
    if sub is not None:
        sub |= {f"attn.{k}": t for k, t in attn_seen.items()} | {"attn": a}
    x = x + gate1.tanh() * a
    h = record(sub, "img_norm2", F.layer_norm(x, x.shape[-1:], eps=EPS)) * (1 + scale2)
    gate = record(sub, "img_mlp.gate_layer", F.linear(h, w["img_mlp.gate_layer.weight"]))
    act = record(sub, "img_mlp.activation_fn", F.silu(gate))
    up = record(sub, "img_mlp.proj", F.linear(h, w["img_mlp.proj.weight"]))
    mlp = record(sub, "img_mlp", record(sub, "img_mlp.out", F.linear(act * up, w["img_mlp.out.weight"])))
    if seen is not None:
        seen |= sub
    x = x + gate2.tanh() * mlp
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x  # fp16's finite range, as diffusers clips


def block_causal(image_ids, key_valid):
    """(B, 1, S, S) bool: (q >= kv or both in one image block) and the key is no padded text."""
    q, kv = image_ids[:, None], image_ids[None, :]
    index = torch.arange(image_ids.shape[0])
    causal = (index[:, None] >= index[None, :]) | ((q == kv) & (q >= 0))
    return causal[None, None] & key_valid[:, None, None, :]


def rope_table(img_shapes, image_pad_mask, axes_dim, theta=10000):
    """(S, sum(axes_dim) / 2) complex64: text advances one position on all three axes; an image block holds the
    frame axis at the text's position and lays its tokens on a height x width grid centred on zero."""
    frame, heights, widths = [], [], []
    cursor = position = 0
    is_image = image_pad_mask.tolist()
    for _, height, width in img_shapes:
        start = is_image.index(True, cursor)
        frame += list(range(position, position + start - cursor))
        position += start - cursor
        cursor = start + height * width
        frame += [position] * (height * width)
        position += max(height, width)
        heights += [h for h in range(-(height - height // 2), height // 2) for _ in range(width)]
        widths += [x for _ in range(height) for x in range(-(width - width // 2), width // 2)]
    frame += list(range(position, position + len(is_image) - cursor))
    axes = [torch.tensor(frame) for _ in range(3)]
    axes[1][image_pad_mask], axes[2][image_pad_mask] = torch.tensor(heights), torch.tensor(widths)
    tables = []
    for index, dim in zip(axes, axes_dim):
        angles = torch.outer(index.float(), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).float().div(dim)))
        tables.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(tables, dim=-1)


def model(w, config, hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask,
          encoder_hidden_states_mask, seen=None, caches=None, mode=None):
    """The whole transformer: the joint sequence of text with condition latents at the image slots and the target
    image appended, its metadata, the shared modulation, the blocks, the final norm and projection. mode "extract"
    stores every block's prefix K and V in caches; "cached" recomputes only the target image's tokens over them."""
    f32 = torch.float32
    batch = hidden_states.shape[0]
    img = record(seen, "img_in", F.linear(hidden_states, w["img_in.weight"]))
    t = encoder_hidden_states.float()  # the text: txt_in, a zero-centred RMSNorm in fp32, then tanh-GELU MLP
    t = (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS) * (w["txt_in.text_norm.weight"].float() + 1))
    t = record(seen, "txt_in.text_norm", t.to(encoder_hidden_states.dtype))
    t = record(seen, "txt_in.in_layer", F.linear(t, w["txt_in.in_layer.weight"]))
    t = record(seen, "txt_in.act", F.gelu(t, approximate="tanh"))
    txt = record(seen, "txt_in", record(seen, "txt_in.out_layer", F.linear(t, w["txt_in.out_layer.weight"])))

    repeats = torch.where(img_mask, 4, 1)[0]  # each image slot stands for 2 x 2 latent tokens
    image_pad_mask = torch.repeat_interleave(img_mask[0], repeats)  # (S,) True at image tokens
    target = math.prod(img_shapes[0][-1])
    joint = torch.cat([txt, txt.new_zeros(batch, target // 4, txt.shape[-1])], dim=1).repeat_interleave(repeats, 1)
    joint[:, image_pad_mask] = img
    freqs = record(seen, "pos_embed", rope_table(img_shapes[0], image_pad_mask, config["axes_dims_rope"]))
    lengths = [math.prod(s) for s in img_shapes[0]]
    image_ids = torch.full(image_pad_mask.shape, -1, dtype=torch.long)
    image_ids[image_pad_mask] = torch.tensor([i for i, n in enumerate(lengths) for _ in range(n)])
    target_token_mask = torch.zeros_like(image_pad_mask)
    target_token_mask[image_pad_mask.nonzero()[-target:, 0]] = True

    t = timestep.to(hidden_states.dtype)
    causal_condition = config["causal_condition"]
    if causal_condition:  # one more row, t = 0, read by the text and condition tokens
        t = torch.cat([t, t.new_zeros(1)])  # the timestep from here on
    # the sinusoidal embedding (256 wide: cos then sin) rounded to fp32; its frequencies computed in fp32, then held
    # in the model's dtype (diffusers' buffer, cast with the model)
    periods = torch.exp(-math.log(10000) * torch.arange(128, dtype=f32) / 128).to(hidden_states.dtype)
    args = (1000.0 * t.float())[:, None] * periods[None]
    t = record(seen, "time_text_embed.time_proj", torch.cat([args.cos(), args.sin()], dim=-1).float())
    t = record(seen, "time_text_embed.timestep_embedder.linear_1",
               F.linear(t.to(hidden_states.dtype), w["time_text_embed.timestep_embedder.linear_1.weight"]))
    t = record(seen, "time_text_embed.timestep_embedder.act", F.silu(t))
    temb = F.linear(t, w["time_text_embed.timestep_embedder.linear_2.weight"])
    for name in ("time_text_embed.timestep_embedder.linear_2", "time_text_embed.timestep_embedder", "time_text_embed"):
        record(seen, name, temb)
    modulation = F.linear(record(seen, "modulation.0", F.silu(temb)), w["modulation.1.weight"])
    modulation = record(seen, "modulation", record(seen, "modulation.1", modulation))  # (B [+ 1], 4 * dim)
    modulation_mask = target_token_mask if causal_condition else None

    key_valid = torch.ones(batch, image_pad_mask.shape[0], dtype=torch.bool)  # False at padded text keys
    if encoder_hidden_states_mask is not None:  # text of the joint sequence: the vision-language text positions
        text = ~img_mask[0][:encoder_hidden_states.shape[1]]
        key_valid[:, ~image_pad_mask] = encoder_hidden_states_mask.bool()[:, text]
    prefix = int((~target_token_mask).sum())
    if mode == "cached":  # the target image's tokens only, over [cached prefix, target]: padded keys masked
        joint, freqs, modulation_mask = joint[:, prefix:], freqs[prefix:], modulation_mask[prefix:]
        mask = key_valid[:, None, None, :]
    else:
        mask = block_causal(image_ids, key_valid)
    for i in range(sum(1 for k in w if k.endswith(".attn.to_qkv.weight"))):
        name = f"transformer_blocks.{i}"
        block_w = {k.removeprefix(f"{name}."): t for k, t in w.items() if k.startswith(f"{name}.")}
        sub = {} if seen is not None else None
        cache = None if caches is None else caches.setdefault(i, {"length": prefix})
        joint = block(block_w, joint, modulation, freqs, mask, modulation_mask, sub, cache, mode)
        if seen is not None:
            seen |= {f"{name}.{k}": v for k, v in sub.items()} | {name: joint}
    scale = record(seen, "norm_out.linear", F.linear(record(seen, "norm_out.silu", F.silu(temb)).to(joint.dtype),
                                                    w["norm_out.linear.weight"]))
    normed = record(seen, "norm_out.norm", F.layer_norm(joint, joint.shape[-1:], eps=EPS))
    joint = record(seen, "norm_out", normed * (1 + rows(scale, modulation_mask)))
    return {"sample": record(seen, "proj_out", F.linear(joint, w["proj_out.weight"]))}


def prefill_attention(w, hidden_states, rotary_emb, attention_mask, seen=None, **ignored):
    length = hidden_states.shape[1]  # the saved element mask is padded to the flex block size
    return {"joint": attention(w, hidden_states, rotary_emb, attention_mask[:, :, :length, :length], seen)}


def prefill_block(w, hidden_states, modulation, rotary_emb, attention_mask, target_token_mask, seen=None, **ignored):
    length = hidden_states.shape[1]
    return {"joint": block(w, hidden_states, modulation, rotary_emb, attention_mask[:, :, :length, :length],
                           target_token_mask, seen)}


def cached_attention(w, next_target, seen_by_call, hidden_states, rotary_emb, attention_mask, key_valid, **ignored):
    """'prefill': the full call over [prefix, next target]; 'cached': extract at this step, then the decode."""
    prefix = hidden_states.shape[1] - next_target.shape[1]
    following = torch.cat([hidden_states[:, :prefix], next_target], dim=1)
    full = prefill_attention(w, following, rotary_emb, attention_mask, seen_by_call[0])["joint"]
    cache, length = {"length": prefix}, hidden_states.shape[1]
    attention(w, hidden_states, rotary_emb, attention_mask[:, :, :length, :length], seen_by_call[1], cache, "extract")
    cached = attention(w, next_target, rotary_emb[prefix:], key_valid[:, None, None, :], seen_by_call[2], cache,
                       "cached")
    return {"prefill": full[:, prefix:], "cached": cached}


def cached_model(w, config, next_target, next_timestep, seen_by_call, **kwargs):
    prefix = kwargs["hidden_states"].shape[1] - next_target.shape[1]
    following = kwargs | {"hidden_states": torch.cat([kwargs["hidden_states"][:, :prefix], next_target], dim=1),
                          "timestep": next_timestep}
    full = model(w, config, **following, seen=seen_by_call[0])["sample"][:, -next_target.shape[1]:]
    caches = {}
    model(w, config, **kwargs, seen=seen_by_call[1], caches=caches, mode="extract")
    cached = model(w, config, **following, seen=seen_by_call[2], caches=caches, mode="cached")["sample"]
    return {"prefill": full, "cached": cached}


def value(spec, tensors):
    if "tensor" in spec:
        t = tensors[spec["tensor"]]
        return torch.view_as_complex(t) if spec.get("complex") else t
    if "block_mask" in spec:  # the block-causal mask's element mask (B, H, S', S'), True: attended
        return tensors[spec["block_mask"]].bool()
    return tuple(value(s, tensors) for s in spec["tuple"]) if "tuple" in spec else spec["value"]


def run(entry, w, kwargs, seen_by_call):
    """The entry's outputs by name; seen_by_call[i]: the submodule outputs of the protocol's call i + 1."""
    cached = entry["call"]["protocol"] == "kv-cache"
    if entry["component"] == "model":
        if cached:
            return cached_model(w, entry["config"], seen_by_call=seen_by_call, **kwargs)
        return model(w, entry["config"], **kwargs, seen=seen_by_call[0])
    if entry["component"] == "block":
        return prefill_block(w, **kwargs, seen=seen_by_call[0])
    if cached:
        return cached_attention(w, seen_by_call=seen_by_call, **kwargs)
    return prefill_attention(w, **kwargs, seen=seen_by_call[0])


inputs, outputs = Path(sys.argv[1]), {}
for entry in json.loads((inputs / "manifest.json").read_text())["entries"]:
    tensors = load_file(inputs / entry["inputs_file"])
    dtype = tensors["hidden_states"].dtype
    weights = {k: t.to(dtype) for k, t in load_file(inputs / entry["weights"]["merged"]).items()}
    kwargs = {k: value(s, tensors) for k, s in entry["kwargs"].items()}
    kwargs.pop("segments", None)  # diffusers' second form of the block-causal structure: the mask says it all
    kwargs.setdefault("encoder_hidden_states_mask", None)
    stem = f"{entry['case']}/{entry['dtype']}"  # of every key written
    seen_by_call = ({}, {}, {})
    with torch.no_grad():
        result = run(entry, weights, kwargs, seen_by_call)
    outputs |= {f"{stem}/{name}": t.contiguous() for name, t in result.items()}
    modules = entry.get("modules", {})  # optional: under the standard's names, where the manifest lists them
    for call, seen in enumerate(seen_by_call, 1):
        for name, t in seen.items():
            key = name if call == 1 else f"{name} (call {call})"
            if modules.get(key) == [list(t.shape)]:
                outputs[f"{stem}/module/{key}/0"] = t.clone()
    if "gradients" in entry:  # optional: the input gradients of sum(output * cotangent), by autograd
        leaves = {k: kwargs[k].clone().requires_grad_() for k in entry["gradients"]["inputs"]}
        result = run(entry, weights, kwargs | leaves, ({}, {}, {}))
        sum((result[o] * tensors[key]).sum() for o, key in entry["gradients"]["cotangents"].items()).backward()
        outputs |= {f"{stem}/grad/{k}": t.grad.contiguous() for k, t in leaves.items()}
save_file(outputs, sys.argv[2])
assert not any(m == "verify" or m.startswith(("verify.", "diffusers")) for m in sys.modules), "not an outside engine"
