"""Qwen-Image (diffusers' QwenImageTransformer2DModel, and Qwen-Image-Edit through its configs): the configs, seeded
models and components, the fixtures and their inputs, and the equivalence cases. Everything depends only on (seed,
dtype, device)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from unittest import mock

import numpy as np
import torch

# the seam: only verify.models imports diffusers' model classes (this module, Qwen-Image's)
from diffusers import (
    AutoencoderKLQwenImage,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    QwenEmbedLayer3DRope,
    QwenEmbedRope,
    QwenImageTransformerBlock,
    apply_rotary_emb_qwen,
    compute_text_seq_len_from_mask,
)
from PIL import Image
from torch import nn

from verify.errors import VerifyError
from verify.models.cases import Case, Outputs, model_outputs
from verify.models.seeded import named_config, seeded, seeded_on

MODEL_CLASS = QwenImageTransformer2DModel  # diffusers' class of the whole model
CLASS_NAME = "QwenImageTransformer2DModel"  # the `_class_name` of its config.json
REFERENCE_ROUNDING = None  # diffusers' model computes in the dtype it runs in (see qwen_image_21.REFERENCE_ROUNDING)
REFERENCE_PRECISION = None  # so its fp64 run, the oracle, is fp64-precise

# diffusers' own test config; "small" is wide enough for several heads per block; "full" is the real model.
CONFIGS: dict[str, dict] = {
    "tiny": dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=(8, 4, 4),
    ),
    "small": dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=6, joint_attention_dim=64, axes_dims_rope=(8, 12, 12),
    ),
    "full": dict(
        patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
    ),
}


@dataclass(frozen=True)
class InputSpec:
    """Sizes of one fixture: batch, image grid in patches, optional reference image, text length and padding."""

    batch: int = 2
    height: int = 4  # image grid, in patches
    width: int = 4
    edit: bool = False  # a reference image of the same grid follows the target tokens
    text_len: int = 8
    pad: tuple[int, ...] = (0, 3)  # padded text tokens at the end, per sample (cycled over the batch)
    timesteps: tuple[float, ...] = (0.25, 0.9)  # per sample (cycled over the batch)

    @property
    def images(self) -> int:
        return 2 if self.edit else 1

    @property
    def image_tokens(self) -> int:
        return self.images * self.height * self.width

    def img_shapes(self) -> list[list[tuple[int, int, int]]]:
        return [[(1, self.height, self.width)] * self.images] * self.batch


# The fixtures the report runs: text-to-image and edit, each with a padded text mask and two timesteps.
FIXTURES: dict[str, InputSpec] = {
    "text-to-image": InputSpec(),
    "edit": InputSpec(edit=True),
}


def model_config(name_or_config: str | dict, **overrides) -> dict:
    """A diffusers config dict from a config name (tiny|small|full) or a dict, with overrides applied."""
    return named_config(CONFIGS, name_or_config, **overrides)


def empty_model(config: dict) -> QwenImageTransformer2DModel:
    """The model's structure without weights (meta device); RoPE tables, which are plain attributes, built for real."""
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**config)
    rope = QwenEmbedLayer3DRope if config.get("use_layer3d_rope") else QwenEmbedRope
    model.pos_embed = rope(theta=10000, axes_dim=list(model.pos_embed.axes_dim), scale_rope=True)
    return model


def build_model(config: dict, seed: int, dtype: torch.dtype = torch.float64) -> QwenImageTransformer2DModel:
    """The standard diffusers model with seeded weights, on the CPU; RMSNorm weights randomised so swaps show."""
    return seeded(lambda: QwenImageTransformer2DModel(**config), seed, dtype)


def model_inputs(config: dict, spec: InputSpec, seed: int) -> dict:
    """fp64 CPU inputs of the full model's forward for `spec`."""
    g = torch.Generator().manual_seed(seed)
    B = spec.batch
    extra = {"additional_t_cond": torch.arange(B) % 2} if config.get("use_additional_t_cond") else {}
    return extra | dict(
        hidden_states=torch.randn(B, spec.image_tokens, config["in_channels"], generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(
            B, spec.text_len, config["joint_attention_dim"], generator=g, dtype=torch.float64
        ),
        encoder_hidden_states_mask=text_mask(spec),
        timestep=torch.tensor([spec.timesteps[i % len(spec.timesteps)] for i in range(B)], dtype=torch.float64),
        img_shapes=spec.img_shapes(),
    )


def text_mask(spec: InputSpec) -> torch.Tensor:
    """[B, T] float mask: ones, with the last pad[b] tokens of sample b zeroed (at least one token stays)."""
    mask = torch.ones(spec.batch, spec.text_len, dtype=torch.float64)
    for b in range(spec.batch):
        pad = min(spec.pad[b % len(spec.pad)], spec.text_len - 1)
        if pad:
            mask[b, -pad:] = 0
    return mask


def rotary_emb(config: dict, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, text) complex RoPE frequencies as the full model computes them for `spec`."""
    rope = QwenEmbedRope(theta=10000, axes_dim=list(config["axes_dims_rope"]), scale_rope=True)
    return rope(spec.img_shapes(), max_txt_seq_len=spec.text_len, device=torch.device("cpu"))


def block_inputs(config: dict, spec: InputSpec, seed: int) -> dict:
    """fp64 CPU inputs of one transformer block's forward (streams already projected to the inner width)."""
    g = torch.Generator().manual_seed(seed)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    B = spec.batch
    zero_cond = config.get("zero_cond_t", False)
    inputs = dict(
        hidden_states=torch.randn(B, spec.image_tokens, dim, generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(B, spec.text_len, dim, generator=g, dtype=torch.float64),
        encoder_hidden_states_mask=text_mask(spec).bool(),
        temb=torch.randn(2 * B if zero_cond else B, dim, generator=g, dtype=torch.float64),
        image_rotary_emb=rotary_emb(config, spec),
    )
    if zero_cond:
        target = spec.height * spec.width
        index = [0] * target + [1] * (spec.image_tokens - target)
        inputs["modulate_index"] = torch.tensor([index] * B, dtype=torch.int)
    return inputs


def attention_inputs(config: dict, spec: InputSpec, seed: int) -> dict:
    """fp64 CPU inputs of one joint attention's forward."""
    inputs = block_inputs(config, spec, seed)
    return {k: inputs[k] for k in ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask",
                                   "image_rotary_emb")}



# The write-up's LoRA: rank 32 on the merged target list, with an alpha (lora_alpha = r: multiplier 1).
LORA_TARGETS = ("attn.to_qkv", "attn.add_qkv_proj", "attn.to_out.0", "attn.to_add_out")
LORA_RANK, LORA_ALPHA = 32, 32.0


def seeded_lora(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA of the write-up's kind for `config`, in Lightning keys with a per-module alpha (lora_down/lora_up):
    A ~ N(0, 1/in), B ~ N(0, 0.1^2 / rank), so that it moves the output visibly without swamping it."""
    g = torch.Generator().manual_seed(seed + 3)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    tensors = {}
    for i in range(config["num_layers"]):
        for target in LORA_TARGETS:
            out = 3 * dim if "qkv" in target else dim
            key = f"transformer_blocks.{i}.{target}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(LORA_RANK, dim, generator=g) / dim**0.5
            tensors[f"{key}.lora_up.weight"] = torch.randn(out, LORA_RANK, generator=g) * 0.1 / LORA_RANK**0.5
            tensors[f"{key}.alpha"] = torch.tensor(LORA_ALPHA)
    return tensors


def build_block(config: dict, seed: int) -> QwenImageTransformerBlock:
    """One seeded standard transformer block at the config's width, in fp64."""
    return seeded(lambda: _new_block(config), seed)


def _new_block(config: dict) -> QwenImageTransformerBlock:
    return QwenImageTransformerBlock(
        dim=config["num_attention_heads"] * config["attention_head_dim"],
        num_attention_heads=config["num_attention_heads"], attention_head_dim=config["attention_head_dim"],
        zero_cond_t=config.get("zero_cond_t", False))


def build_attention(config: dict, seed: int) -> nn.Module:
    """The joint attention of build_block's block."""
    return build_block(config, seed).attn


# Block-by-block streaming (verify.checks.streaming): what QwenImageTransformer2DModel.forward does before the first
# block and after the last, line for line (a test holds them to it bit for bit), and one block's step.
STREAMS = ("hidden_states", "encoder_hidden_states")  # the state each block advances, checked after every block


def block_shell(config: dict) -> QwenImageTransformerBlock:
    """One standard block's structure, on the meta device."""
    with torch.device("meta"):
        return _new_block(config)


@torch.no_grad()
def stream_prologue(top: nn.Module, config: dict, inputs: dict) -> dict:
    """Everything QwenImageTransformer2DModel.forward does before the first block: the first block's arguments."""
    hidden_states = top.img_in(inputs["hidden_states"])
    timestep = inputs["timestep"].to(hidden_states.dtype)
    modulate_index = None
    if config.get("zero_cond_t"):
        timestep = torch.cat([timestep, timestep * 0], dim=0)
        modulate_index = torch.tensor(
            [[0] * prod(s[0]) + [1] * sum(prod(x) for x in s[1:]) for s in inputs["img_shapes"]],
            device=timestep.device, dtype=torch.int,
        )
    encoder_hidden_states = top.txt_in(top.txt_norm(inputs["encoder_hidden_states"]))
    text_seq_len, _, mask = compute_text_seq_len_from_mask(encoder_hidden_states,
                                                           inputs.get("encoder_hidden_states_mask"))
    temb = top.time_text_embed(timestep, hidden_states, inputs.get("additional_t_cond"))
    rotary = top.pos_embed(inputs["img_shapes"], max_txt_seq_len=text_seq_len, device=hidden_states.device)
    return dict(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                encoder_hidden_states_mask=mask, temb=temb, image_rotary_emb=rotary, modulate_index=modulate_index)


def stream_step(block: nn.Module, state: dict) -> dict:
    """One transformer block: the next block's arguments."""
    encoder_hidden_states, hidden_states = block(**state)
    return state | dict(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states)


@torch.no_grad()
def stream_epilogue(top: nn.Module, config: dict, state: dict) -> torch.Tensor:
    """Everything QwenImageTransformer2DModel.forward does after the last block: the model's sample."""
    temb = state["temb"].chunk(2, dim=0)[0] if config.get("zero_cond_t") else state["temb"]
    return top.proj_out(top.norm_out(state["hidden_states"], temb))


def attention_outputs(attn: nn.Module, inputs: dict) -> Outputs:
    img, txt = attn(**inputs)
    return {"image": img, "text": txt}


def block_outputs(block: nn.Module, inputs: dict) -> Outputs:
    txt, img = block(**inputs)
    return {"image": img, "text": txt}


def _model_case(name: str, spec: InputSpec, grads: bool = False, **overrides) -> Case:
    return Case(
        name=name, component="model", build=build_model, inputs=model_inputs,
        outputs=model_outputs, config=model_config("tiny", **overrides), spec=spec, grads=grads,
    )


CASES: dict[str, Case] = {
    case.name: case
    for case in [
        Case("attention", "attention", build_attention, attention_inputs, attention_outputs, model_config("tiny"),
             InputSpec(), grads=True),
        Case("block", "block", build_block, block_inputs, block_outputs, model_config("tiny"), InputSpec(),
             grads=True),
        Case("block-edit-zero-cond", "block", build_block, block_inputs, block_outputs,
             config=model_config("tiny", zero_cond_t=True), spec=InputSpec(edit=True), grads=True),
        _model_case("model-text-to-image", FIXTURES["text-to-image"], grads=True),
        _model_case("model-edit", FIXTURES["edit"]),
        _model_case("model-edit-zero-cond", FIXTURES["edit"], zero_cond_t=True),  # Qwen-Image-Edit-2511
        _model_case("model-layered", FIXTURES["edit"], use_layer3d_rope=True, use_additional_t_cond=True),
    ]
}


# Sampling (verify.checks.sampling): diffusers' own pipeline, a seeded tiny VAE (diffusers' pipeline tests' config)
# and prompt embeddings given in place of a text encoder; the edit pipelines with a seeded condition image.
PIPELINE_CLASS = QwenImagePipeline
# --fixture -> diffusers' pipeline, and the transformer config's overrides (Qwen-Image-Edit-2511: zero_cond_t)
SAMPLING_FIXTURES: dict[str, tuple[type, dict]] = {
    "text-to-image": (QwenImagePipeline, {}),
    "edit": (QwenImageEditPipeline, {}),
    "edit-2511": (QwenImageEditPlusPipeline, {"zero_cond_t": True}),
}
TRUE_CFG_SCALE = 4.0  # the default of each of those pipelines
SAMPLE_SIZE = (32, 32)  # pixels: 8 x 8 latents, 4 x 4 image tokens
VAE_CONFIG = dict(base_dim=24, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True])

CONDITION_AREA = ("diffusers' edit pipelines size the condition image to a 1024 x 1024 area (and 384 x 384 for the "
                  "text encoder), whatever the output; here to the output's area, so that a tiny run stays tiny "
                  "(the same at --size 1024x1024); the seeded image, as the pipeline hands it over in the run's "
                  "dtype, is encoded by the one fp64 VAE (argmax) and its latents cast to the run's dtype")


def sampling_setup(fixture: str) -> dict[str, str]:
    """What a run of `fixture` records beside verify.checks.sampling's own setup."""
    return {} if fixture == "text-to-image" else {"condition_image": CONDITION_AREA}


def build_vae(config: dict, seed: int) -> AutoencoderKLQwenImage:
    """The seeded tiny VAE, in fp64: every run's latents decode through the same exact decoder (its latent channels
    packed 2 x 2 are the transformer's input channels: 4 for the tiny and small configs' 16, 16 for the real 64)."""
    channels = vae_latent_channels(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 4)
        vae = AutoencoderKLQwenImage(**VAE_CONFIG, z_dim=channels, latents_mean=[0.0] * channels,
                                     latents_std=[1.0] * channels)
    return torch.nn.Module.to(vae, torch.float64).eval()


def load_vae(config: dict, weights: dict[str, torch.Tensor]) -> AutoencoderKLQwenImage:
    """The VAE of a diffusers folder (`sample --vae`: its config.json and tensors), in fp64 as the seeded one."""
    from verify.models.folder import component

    return component(AutoencoderKLQwenImage, config, weights)


def vae_latent_channels(config: dict) -> int:
    """The latent channels the VAE must have (its z_dim) for the transformer of `config`: the pipeline unpacks each
    token's in_channels into 2 x 2 latent pixels."""
    return config["in_channels"] // 4


def sampling_pipeline(transformer: nn.Module, vae: nn.Module, scheduler, fixture: str = "text-to-image"):
    """diffusers' pipeline of `fixture` without a text encoder (prompt embeddings are given); the edit pipelines'
    condition image encoded by the fp64 VAE whatever the run's dtype (the pipeline hands the VAE the run's dtype)."""
    cls = SAMPLING_FIXTURES[fixture][0]
    if cls is QwenImagePipeline:
        return cls(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, processor=None,
               transformer=transformer)
    encode = pipe._encode_vae_image
    pipe._encode_vae_image = lambda image, generator: encode(image.to(vae.dtype), generator).to(image.dtype)
    return pipe


@contextmanager
def sampling_context(fixture: str, height: int, width: int):
    """While a pipeline of `fixture` runs: an edit pipeline's condition-image areas (1024 x 1024, 384 x 384 in
    diffusers, whatever the output) made the output's, through the pipeline module's own calculate_dimensions."""
    cls = SAMPLING_FIXTURES[fixture][0]
    if cls is QwenImagePipeline:
        yield
        return
    where = sys.modules[cls.__module__]
    size_of = where.calculate_dimensions
    with mock.patch.object(where, "calculate_dimensions", lambda _area, ratio: size_of(height * width, ratio)):
        yield


def condition_inputs(fixture: str, size: tuple[int, int], seed: int) -> dict:
    """The pipeline's keyword arguments of `fixture` beside the prompt: an edit's condition image, seeded RGB pixels
    of the output's size."""
    if SAMPLING_FIXTURES[fixture][0] is QwenImagePipeline:
        return {}
    pixels = np.random.default_rng(seed + 8).integers(0, 256, (*size, 3), dtype=np.uint8)
    return {"image": Image.fromarray(pixels)}


def sample_tokens(height: int, width: int) -> int:
    """Image tokens of a `height` x `width` image (the VAE's downsampling, then 2 x 2 patches), or VerifyError."""
    scale = 2 ** len(VAE_CONFIG["temperal_downsample"])
    if height % (2 * scale) or width % (2 * scale):
        raise VerifyError(f"--size {height}x{width}: each side must be a multiple of {2 * scale} (the VAE's "
                          f"{scale}x downsampling, then 2 x 2 patches)")
    return (height // scale // 2) * (width // scale // 2)


def replay_caches(transformer: nn.Module, history: list[dict], calls: list[dict], cast) -> list[dict]:
    """`calls` as they are: Qwen-Image's pipelines keep no model state from one step to the next."""
    return calls


def prompt_embeddings(config: dict, seed: int, text_len: int = 8) -> dict:
    """Seeded prompt and negative-prompt embeddings of one length with different padding (as a batch of prompts is
    padded), as the pipeline's keyword arguments."""
    g = torch.Generator().manual_seed(seed + 6)
    width = config["joint_attention_dim"]
    mask, negative_mask = (torch.ones(1, text_len, dtype=torch.long) for _ in range(2))
    mask[0, -2:], negative_mask[0, -(text_len // 2 + 1):] = 0, 0
    return dict(prompt_embeds=torch.randn(1, text_len, width, generator=g, dtype=torch.float64),
                prompt_embeds_mask=mask,
                negative_prompt_embeds=torch.randn(1, text_len, width, generator=g, dtype=torch.float64),
                negative_prompt_embeds_mask=negative_mask)


# Bench (verify.bench): one block at a bench width, seeded and built on the device in the bench's dtype, its inputs
# at an image grid and a text length (no text padding: pipelines pass None), its matmul FLOPs, what its outputs are
# and where a LoRA goes.
BENCH_OUTPUTS = {"text": "encoder_hidden_states", "image": "hidden_states"}  # in the block's order -> the input of
# that shape (whose gradient is judged)
BENCH_LORA_TARGETS = {"standard": ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"),
                      "merged": ("to_qkv", "add_qkv_proj"), "out": ("to_out.0", "to_add_out")}  # the write-up's


def bench_block(config: dict, seed: int, device: str, dtype: torch.dtype) -> QwenImageTransformerBlock:
    """A standard block with seeded weights, built on `device` and cast to `dtype` (never fp64 on the way)."""
    from verify.models.seeded import randomise_norms

    torch.manual_seed(seed)
    with torch.device(device):
        block = _new_block(config)
    randomise_norms(block, seed)
    return nn.Module.to(block, dtype=dtype).eval()


def bench_inputs(config: dict, grid: tuple[int, int], text_tokens: int, batch: int, seed: int, device: str,
                 dtype: torch.dtype) -> dict:
    """Seeded inputs of one block (standard normal) for an image of `grid` (height, width) patches."""
    g = torch.Generator(device=device).manual_seed(seed + prod(grid))
    dim = config["num_attention_heads"] * config["attention_head_dim"]

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=dtype)

    rope = QwenEmbedRope(theta=10000, axes_dim=list(config["axes_dims_rope"]), scale_rope=True)
    freqs = rope([[(1, *grid)]] * batch, max_txt_seq_len=text_tokens, device=torch.device(device))
    return dict(hidden_states=randn(batch, prod(grid), dim), encoder_hidden_states=randn(batch, text_tokens, dim),
                encoder_hidden_states_mask=None, temb=randn(batch, dim), image_rotary_emb=freqs)


def bench_flops(config: dict, image_tokens: int, text_tokens: int) -> tuple[float, float]:
    """One sample's forward FLOPs of the block's matrix multiplies: (linear layers, attention's two products).
    q, k, v, out of both streams: 8 N d^2; the MLPs 16 N d^2; img_mod and txt_mod (d -> 6d); Q K^T and P V over the
    joint sequence."""
    d, n = config["num_attention_heads"] * config["attention_head_dim"], image_tokens + text_tokens
    return 24 * n * d * d + 2 * 2 * d * 6 * d, 4 * n * n * d


def bench_sequence(inputs: dict) -> list[tuple[torch.Tensor, int]]:
    """The (tensor, dim) of the inputs that grow with the image tokens (compiled as one symbol)."""
    return [(inputs["hidden_states"], 1), (inputs["image_rotary_emb"][0], 0)]


# The whole model (verify.bench.full_model, --full-model): built in the bench's dtype directly on the device, its
# inputs at an image grid and a text length (no text padding), its matmul FLOPs.
BENCH_FULL_MODEL_TOKENS = 1  # --full-model's image tokens come in multiples of this (any grid of patches)


def bench_full_model(config: dict, seed: int, device: str, dtype: torch.dtype) -> QwenImageTransformer2DModel:
    """The whole model of `config` with seeded weights, built in `dtype` directly on `device` (about 41 GB at the real
    size in bf16; never fp32 or fp64 on the way)."""
    return seeded_on(QwenImageTransformer2DModel, config, seed, device, dtype)


def bench_full_model_inputs(config: dict, grid: tuple[int, int], text_tokens: int, batch: int, seed: int, device: str,
                            dtype: torch.dtype) -> dict:
    """Seeded inputs (standard normal) of the whole model's forward for an image of `grid` (height, width) patches."""
    g = torch.Generator(device=device).manual_seed(seed + prod(grid))

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=dtype)

    return dict(hidden_states=randn(batch, prod(grid), config["in_channels"]),
                encoder_hidden_states=randn(batch, text_tokens, config["joint_attention_dim"]),
                encoder_hidden_states_mask=None, timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                img_shapes=[[(1, *grid)]] * batch)


def bench_full_model_flops(config: dict, image_tokens: int, text_tokens: int) -> float:
    """One sample's forward FLOPs of the whole model's matrix multiplies: every block's (bench_flops), img_in and
    txt_in, and proj_out over the image tokens (the time embedding and norm_out's, a row per sample, are negligible)."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    out = config["patch_size"] ** 2 * config["out_channels"]
    edges = 2 * (image_tokens * config["in_channels"] * d + text_tokens * config["joint_attention_dim"] * d
                 + image_tokens * d * out)
    return config["num_layers"] * sum(bench_flops(config, image_tokens, text_tokens)) + edges
