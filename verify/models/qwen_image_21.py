"""Qwen-Image 2.1 (diffusers' QwenImage21Transformer2DModel): one joint stream of text and image tokens, a
block-causal mask, one shared modulation and a prefix KV cache. The configs, seeded models and components, the
fixtures and their inputs, and the equivalence cases, including the cached path judged beside the full prefill.
Everything depends only on (seed, dtype, device)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from unittest import mock

import numpy as np
import torch

# the seam: only verify.models imports diffusers' model classes (this module, Qwen-Image 2.1's)
from diffusers import AutoencoderKLQwenImage21, QwenImage21Pipeline
from diffusers.models.transformers.transformer_qwenimage21 import (
    QwenImage21Attention,
    QwenImage21AttnProcessor,
    QwenImage21FlexAttnProcessor,
    QwenImage21KVCache,
    QwenImage21KVLayerCache,
    QwenImage21Rope,
    QwenImage21Transformer2DModel,
    QwenImage21TransformerBlock,
    _qwenimage21_prefix_segments,
    apply_rotary_emb_qwen,
    build_qwenimage21_block_causal_mask,
)
from diffusers.pipelines.qwenimage21 import pipeline_qwenimage21
from PIL import Image
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

from verify.errors import VerifyError
from verify.models.cases import Case, Outputs, model_outputs
from verify.models.seeded import named_config, seeded, seeded_on

MODEL_CLASS = QwenImage21Transformer2DModel  # diffusers' class of the whole model
CLASS_NAME = "QwenImage21Transformer2DModel"  # the `_class_name` of its config.json
# What diffusers' own model rounds below the dtype it runs in (`x.float()` in its RoPE and RMSNorm,
# `dtype=torch.float32` in its timestep embedding), so its fp64 run, the oracle, is fp32-precise: fp64 runs judged
# against it are judged at fp32's floor (a correct fused GEMM's last-ulp differences cross its fp32 roundings and
# land at fp32's level on a GPU: reports/gpu/NOTES.md, report-21-full-h100.json)
REFERENCE_ROUNDING = ("diffusers' Qwen-Image 2.1 computes its RoPE, RMSNorm and timestep embedding in fp32 whatever "
                      "the dtype")
REFERENCE_PRECISION = "fp32"
TOKENS_PER_SLOT = 4  # each image slot of the vision-language sequence stands for 2 x 2 latent tokens

# "tiny" and "small" for CI (several heads per block, every RoPE axis even); "full" is the real model.
CONFIGS: dict[str, dict] = {
    "tiny": dict(
        patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        context_in_dim=16, mlp_ratio=3, axes_dims_rope=(4, 6, 6), causal_condition=True,
    ),
    "small": dict(
        patch_size=1, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=32, num_attention_heads=6,
        context_in_dim=64, mlp_ratio=3, axes_dims_rope=(8, 12, 12), causal_condition=True,
    ),
    "full": dict(
        patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128, num_attention_heads=32,
        context_in_dim=4096, mlp_ratio=3, axes_dims_rope=(16, 56, 56), causal_condition=True,
    ),
}


@dataclass(frozen=True)
class InputSpec:
    """Sizes of one fixture: batch, text, the condition images and the target image (each (height, width) in latent
    tokens, a multiple of 4 in all), text padding and timesteps."""

    batch: int = 2
    text_len: int = 8  # text positions of the vision-language sequence
    conditions: tuple[tuple[int, int], ...] = ()  # condition images, in sequence order
    adjacent: bool = False  # the condition images sit next to each other with no text between them
    target: tuple[int, int] = (4, 4)
    pad: tuple[int, ...] = (0, 3)  # padded text positions at the end, per sample (cycled over the batch)
    timesteps: tuple[float, ...] = (0.25, 0.9)  # per sample (cycled over the batch)

    def img_shapes(self) -> list[list[tuple[int, int, int]]]:
        return [[(1, h, w) for h, w in (*self.conditions, self.target)]] * self.batch

    @property
    def condition_tokens(self) -> int:
        return sum(h * w for h, w in self.conditions)

    @property
    def target_tokens(self) -> int:
        return self.target[0] * self.target[1]

    def img_mask(self) -> torch.Tensor:
        """[B, L + target slots] bool: True at the image slots of the vision-language sequence. Half the text comes
        first, then the condition images (one text token between two of them unless `adjacent`), then the rest."""
        slots = [torch.ones(h * w // TOKENS_PER_SLOT, dtype=torch.bool) for h, w in self.conditions]
        gaps = len(slots) - 1 if slots and not self.adjacent else 0
        head = self.text_len // 2 - gaps
        parts = [torch.zeros(head, dtype=torch.bool)]
        for i, run in enumerate(slots):
            parts += [run] + ([torch.zeros(1, dtype=torch.bool)] if gaps and i < len(slots) - 1 else [])
        parts += [torch.zeros(self.text_len - head - gaps, dtype=torch.bool),
                  torch.ones(self.target_tokens // TOKENS_PER_SLOT, dtype=torch.bool)]
        return torch.cat(parts).expand(self.batch, -1).clone()


# The fixtures: text only; one condition image; two adjacent condition images (two blocks, not one); batch 2 with
# unequal text padding runs through all of them.
FIXTURES: dict[str, InputSpec] = {
    "text-to-image": InputSpec(),
    "edit": InputSpec(conditions=((4, 4),)),
    "edit-adjacent": InputSpec(conditions=((2, 4), (4, 2)), adjacent=True),
}


def model_config(name_or_config: str | dict, **overrides) -> dict:
    """A diffusers config dict from a config name (tiny|small|full) or a dict, with overrides applied."""
    return named_config(CONFIGS, name_or_config, **overrides)


def empty_model(config: dict) -> QwenImage21Transformer2DModel:
    """The model's structure without weights (meta device); the tables computed at construction, which no checkpoint
    holds (RoPE's plain attribute, the timestep embedding's non-persistent buffer), built for real."""
    with torch.device("meta"):
        model = QwenImage21Transformer2DModel(**config)
    model.pos_embed = QwenImage21Rope(theta=10000, axes_dim=list(model.pos_embed.axes_dim))
    time_proj = model.time_text_embed.time_proj
    model.time_text_embed.time_proj = type(time_proj)(time_proj.timestep_dim, time_factor=time_proj.time_factor)
    return model


def build_model(config: dict, seed: int, dtype: torch.dtype = torch.float64) -> QwenImage21Transformer2DModel:
    """The standard diffusers model with seeded weights, on the CPU; norm weights randomised so swaps show."""
    return seeded(lambda: QwenImage21Transformer2DModel(**config), seed, dtype)


def build_block(config: dict, seed: int) -> QwenImage21TransformerBlock:
    """One seeded standard block at the config's width, in fp64."""
    return seeded(lambda: QwenImage21TransformerBlock(
        dim=config["num_attention_heads"] * config["attention_head_dim"],
        num_attention_heads=config["num_attention_heads"], attention_head_dim=config["attention_head_dim"],
        mlp_ratio=config.get("mlp_ratio", 3)), seed)


def build_attention(config: dict, seed: int) -> nn.Module:
    """The attention of build_block's block."""
    return build_block(config, seed).attn


def text_mask(spec: InputSpec, length: int) -> torch.Tensor:
    """[B, length] bool mask of the vision-language sequence: the last pad[b] positions of sample b are padding."""
    mask = torch.ones(spec.batch, length, dtype=torch.bool)
    for b in range(spec.batch):
        pad = min(spec.pad[b % len(spec.pad)], spec.text_len // 2 - 1)
        if pad:
            mask[b, -pad:] = False
    return mask


def model_inputs(config: dict, spec: InputSpec, seed: int) -> dict:
    """fp64 CPU inputs of the model's forward for `spec`: latents (condition images first), the vision-language
    embeddings with their image slots, the text mask."""
    g = torch.Generator().manual_seed(seed)
    B, img_mask = spec.batch, spec.img_mask()
    length = img_mask.shape[1] - spec.target_tokens // TOKENS_PER_SLOT
    latents = spec.condition_tokens + spec.target_tokens
    return dict(
        hidden_states=torch.randn(B, latents, config["in_channels"], generator=g, dtype=torch.float64),
        encoder_hidden_states=torch.randn(B, length, config["context_in_dim"], generator=g, dtype=torch.float64),
        encoder_hidden_states_mask=text_mask(spec, length),
        timestep=torch.tensor([spec.timesteps[i % len(spec.timesteps)] for i in range(B)], dtype=torch.float64),
        img_shapes=spec.img_shapes(),
        img_mask=img_mask,
    )


@dataclass(frozen=True)
class Joint:
    """The joint sequence's metadata, as QwenImage21Transformer2DModel.forward derives it before the first block."""

    image_pad_mask: torch.Tensor  # (S,) True at image tokens
    image_ids: torch.Tensor  # (S,) -1 at text, one id per image block
    target_token_mask: torch.Tensor  # (S,) True at the target image's tokens
    key_valid: torch.Tensor  # (B, S) False at padded text keys
    prefix_len: int


def joint(spec: InputSpec) -> Joint:
    """The metadata of `spec`'s joint sequence, computed by diffusers' own functions where it has them."""
    img_mask = spec.img_mask()
    repeats = torch.where(img_mask, TOKENS_PER_SLOT, 1)[0]
    pad_mask = torch.repeat_interleave(img_mask[0], repeats)
    image_ids, target = QwenImage21Transformer2DModel.build_token_metadata(pad_mask, spec.img_shapes()[0])
    length = img_mask.shape[1] - spec.target_tokens // TOKENS_PER_SLOT
    key_valid = torch.ones(spec.batch, pad_mask.shape[0], dtype=torch.bool)
    key_valid[:, (~pad_mask).nonzero(as_tuple=True)[0]] = text_mask(spec, length)[:, ~img_mask[0][:length]]
    return Joint(pad_mask, image_ids, target, key_valid, int((~target).sum()))


def block_inputs(config: dict, spec: InputSpec, seed: int) -> dict:
    """fp64 CPU inputs of one block's prefill over the joint sequence: both forms of the block-causal structure
    (diffusers' segments and flex BlockMask, each processor reads its own), RoPE, the modulation rows."""
    g = torch.Generator().manual_seed(seed)
    meta = joint(spec)
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    rows = spec.batch + 1 if config.get("causal_condition", True) else spec.batch
    rope = QwenImage21Rope(theta=10000, axes_dim=list(config["axes_dims_rope"]))
    return dict(
        hidden_states=torch.randn(spec.batch, meta.image_pad_mask.shape[0], dim, generator=g, dtype=torch.float64),
        modulation=torch.randn(rows, 4 * dim, generator=g, dtype=torch.float64),
        rotary_emb=rope(spec.img_shapes()[0], meta.image_pad_mask, device=torch.device("cpu")),
        attention_mask=block_causal_mask(meta.image_ids, meta.key_valid, spec.batch, "cpu"),
        target_token_mask=meta.target_token_mask if config.get("causal_condition", True) else None,
        segments=_qwenimage21_prefix_segments(meta.image_ids, meta.prefix_len),
        key_valid=meta.key_valid,
    )


def block_causal_mask(image_ids: torch.Tensor, key_valid: torch.Tensor, batch: int, device: str) -> BlockMask:
    """diffusers' block-causal flex BlockMask on `device`, which rebuilds itself on another (`rebuild_on`, read by
    verify.checks.inputs.cast_inputs): its mask_mod reads image_ids and key_valid where they were when it was built,
    and BlockMask.to moves its blocks, not them."""
    mask = build_qwenimage21_block_causal_mask(image_ids.to(device), key_valid.to(device), batch, torch.device(device))
    mask.rebuild_on = lambda where: block_causal_mask(image_ids, key_valid, batch, where)
    return mask


def attention_inputs(config: dict, spec: InputSpec, seed: int) -> dict:
    """fp64 CPU inputs of one attention's prefill."""
    inputs = block_inputs(config, spec, seed)
    return {k: inputs[k] for k in ("hidden_states", "rotary_emb", "attention_mask", "segments", "key_valid")}


def attention_outputs(attn: nn.Module, inputs: dict) -> Outputs:
    return {"joint": attn(**inputs)}


def block_outputs(block: nn.Module, inputs: dict) -> Outputs:
    return {"joint": block(**inputs)}


def cache_inputs(config: dict, spec: InputSpec, seed: int) -> dict:
    """An attention's prefill inputs and the next denoising step's target tokens, whose cached decode is judged."""
    inputs = attention_inputs(config, spec, seed)
    g = torch.Generator().manual_seed(seed + 5)
    target = spec.target_tokens
    next_target = torch.randn(spec.batch, target, inputs["hidden_states"].shape[-1], generator=g,
                              dtype=torch.float64)
    return inputs | {"next_target": next_target}


def cached_attention_outputs(attn: nn.Module, inputs: dict) -> Outputs:
    """The next step's target tokens twice: by the full prefill of [prefix, next target], and by the decode that
    attends over the cached prefix (K and V stored by an `extract` prefill of this step)."""
    inputs = dict(inputs)
    next_target = inputs.pop("next_target")
    prefix = inputs["hidden_states"].shape[1] - next_target.shape[1]
    following = torch.cat([inputs["hidden_states"][:, :prefix], next_target], dim=1)
    full = attn(**inputs | {"hidden_states": following})[:, prefix:]
    cache = QwenImage21KVLayerCache()
    attn(**inputs, layer_cache=cache, kv_cache_mode="extract", cache_write_slice=slice(0, prefix))
    cached = attn(hidden_states=next_target, rotary_emb=inputs["rotary_emb"][prefix:], layer_cache=cache,
                  kv_cache_mode="cached", attention_mask=inputs["key_valid"][:, None, None, :])
    return {"prefill": full, "cached": cached}


def cache_model_inputs(config: dict, spec: InputSpec, seed: int) -> dict:
    """The model's inputs and the next step's target latents and timestep."""
    inputs = model_inputs(config, spec, seed)
    g = torch.Generator().manual_seed(seed + 5)
    next_target = torch.randn(spec.batch, spec.target_tokens, config["in_channels"], generator=g,
                              dtype=torch.float64)
    return inputs | {"next_target": next_target, "next_timestep": inputs["timestep"] * 0.5}


def cached_model_outputs(model: nn.Module, inputs: dict) -> Outputs:
    """The next step's prediction twice: by a full prefill, and by the pipeline's way (an `extract` prefill at this
    step, then a `cached` decode at the next)."""
    inputs = dict(inputs)
    next_target, next_timestep = inputs.pop("next_target"), inputs.pop("next_timestep")
    prefix = inputs["hidden_states"].shape[1] - next_target.shape[1]
    following = inputs | {"hidden_states": torch.cat([inputs["hidden_states"][:, :prefix], next_target], dim=1),
                          "timestep": next_timestep}
    full = model(**following).sample[:, -next_target.shape[1]:]
    cache = QwenImage21KVCache(len(model.transformer_blocks))
    model(**inputs, kv_cache=cache, kv_cache_mode="extract")
    cached = model(**following, kv_cache=cache, kv_cache_mode="cached").sample
    return {"prefill": full, "cached": cached}


def _case(name: str, component: str, spec: InputSpec = InputSpec(), grads: bool = False, **overrides) -> Case:
    build, inputs, outputs = {
        "attention": (build_attention, attention_inputs, attention_outputs),
        "attention-cache": (build_attention, cache_inputs, cached_attention_outputs),
        "block": (build_block, block_inputs, block_outputs),
        "model": (build_model, model_inputs, model_outputs),
        "model-cache": (build_model, cache_model_inputs, cached_model_outputs),
    }[component]
    return Case(name, component.removesuffix("-cache"), build, inputs, outputs, model_config("tiny", **overrides),
                spec, grads=grads, reference_precision=REFERENCE_PRECISION)


CASES: dict[str, Case] = {
    case.name: case
    for case in [
        _case("attention", "attention", FIXTURES["edit"], grads=True),
        _case("attention-adjacent", "attention", FIXTURES["edit-adjacent"]),
        _case("attention-cache", "attention-cache", FIXTURES["edit"]),
        _case("block", "block", FIXTURES["edit"], grads=True),
        _case("block-no-causal-condition", "block", FIXTURES["edit"], causal_condition=False),
        _case("model-text-to-image", "model", FIXTURES["text-to-image"], grads=True),
        _case("model-edit", "model", FIXTURES["edit"]),
        _case("model-edit-adjacent", "model", FIXTURES["edit-adjacent"]),
        _case("model-edit-no-causal-condition", "model", FIXTURES["edit"], causal_condition=False),
        _case("model-cache", "model-cache", FIXTURES["edit"]),
    ]
}



# Block-by-block streaming (verify.checks.streaming): what QwenImage21Transformer2DModel.forward does before the first
# block and after the last on its prefill path (no KV cache), line for line (a test holds them to it bit for bit), and
# one block's step. The forward hands every block the block-causal structure in the form the installed processors
# read (the flex BlockMask where any is QwenImage21FlexAttnProcessor, the prefix segments unless all are); streamed,
# the blocks are built after the prologue, so each block's step hands it the form its own processor reads (with a
# mixed set each of diffusers' processors reads only its own form of the two the forward hands it).
STREAMS = ("hidden_states",)  # the joint sequence, the state each block advances, checked after every block
_BLOCK_ARGS = ("hidden_states", "modulation", "rotary_emb", "target_token_mask", "key_valid")


def block_shell(config: dict) -> QwenImage21TransformerBlock:
    """One standard block's structure, on the meta device (the model's eps and mlp_ratio)."""
    with torch.device("meta"):
        return QwenImage21TransformerBlock(
            dim=config["num_attention_heads"] * config["attention_head_dim"],
            num_attention_heads=config["num_attention_heads"], attention_head_dim=config["attention_head_dim"],
            mlp_ratio=config.get("mlp_ratio", 3), eps=config.get("eps", 1e-6))


@torch.no_grad()
def stream_prologue(top: nn.Module, config: dict, inputs: dict) -> dict:
    """Everything QwenImage21Transformer2DModel.forward does before the first block (prefill, no KV cache): the first
    block's arguments, and what the blocks' masks and the epilogue are made from."""
    hidden_states, img_mask, img_shapes = inputs["hidden_states"], inputs["img_mask"], inputs["img_shapes"]
    encoder_hidden_states_mask = inputs.get("encoder_hidden_states_mask")
    batch_size = hidden_states.shape[0]
    hidden_states = top.img_in(hidden_states)
    encoder_hidden_states = top.txt_in(inputs["encoder_hidden_states"])

    repeats = torch.where(img_mask, TOKENS_PER_SLOT, 1)[0]
    image_pad_mask = torch.repeat_interleave(img_mask[0], repeats)
    target_tokens = math.prod(img_shapes[0][-1])
    joint_hidden_states = torch.cat(
        [encoder_hidden_states,
         encoder_hidden_states.new_zeros(batch_size, target_tokens // 4, encoder_hidden_states.shape[2])], dim=1)
    joint_hidden_states = joint_hidden_states.repeat_interleave(repeats, dim=1)
    joint_hidden_states[:, image_pad_mask] = hidden_states

    rotary_emb = top.pos_embed(img_shapes[0], image_pad_mask, device=hidden_states.device)
    image_ids, target_token_mask = top.build_token_metadata(image_pad_mask, img_shapes[0])

    timestep = inputs["timestep"].to(hidden_states.dtype)
    if top.config.causal_condition:
        timestep = torch.cat([timestep, timestep.new_zeros(1)], dim=0)
        modulation_mask = target_token_mask
    else:
        modulation_mask = None
    temb = top.time_text_embed(timestep, hidden_states)
    modulation = top.modulation(temb)

    joint_key_valid = None
    if encoder_hidden_states_mask is not None:
        joint_key_valid = torch.ones(batch_size, image_pad_mask.shape[0], dtype=torch.bool,
                                     device=hidden_states.device)
        text_positions = (~image_pad_mask).nonzero(as_tuple=True)[0]
        vlm_text_positions = ~img_mask[0][: encoder_hidden_states_mask.shape[1]]
        joint_key_valid[:, text_positions] = encoder_hidden_states_mask.bool()[:, vlm_text_positions]

    prefix_len = int((~target_token_mask).sum())
    return dict(hidden_states=joint_hidden_states, modulation=modulation, rotary_emb=rotary_emb,
                target_token_mask=modulation_mask, key_valid=joint_key_valid, temb=temb, image_ids=image_ids,
                segments=_qwenimage21_prefix_segments(image_ids, prefix_len), block_mask=None)


def _is_flex(block: nn.Module) -> bool:
    """Whether the block's attention runs diffusers' flex processor (which reads the BlockMask, not the segments)."""
    return isinstance(getattr(getattr(block, "attn", None), "processor", None), QwenImage21FlexAttnProcessor)


def stream_step(block: nn.Module, state: dict) -> dict:
    """One block's prefill: the next block's arguments. The block-causal structure goes down as the forward sends it
    for this block's processor: the flex BlockMask (built once, then kept in the state) or the prefix segments."""
    flex = _is_flex(block)
    block_mask = state["block_mask"]
    if flex and block_mask is None:
        hidden_states = state["hidden_states"]
        block_mask = build_qwenimage21_block_causal_mask(state["image_ids"], state["key_valid"],
                                                         hidden_states.shape[0], hidden_states.device)
    hidden_states = block(**{k: state[k] for k in _BLOCK_ARGS}, attention_mask=block_mask if flex else None,
                          segments=None if flex else state["segments"])
    return state | dict(hidden_states=hidden_states, block_mask=block_mask)


@torch.no_grad()
def stream_epilogue(top: nn.Module, config: dict, state: dict) -> torch.Tensor:
    """Everything QwenImage21Transformer2DModel.forward does after the last block: the model's sample."""
    return top.proj_out(top.norm_out(state["hidden_states"], state["temb"], state["target_token_mask"]))



# Sampling (verify.checks.sampling): diffusers' own QwenImage21Pipeline with its prefix KV cache on, as by default (the
# first step's call prefills the cache, "extract"; every later step decodes the target image over it, "cached"), a
# seeded tiny AutoencoderKLQwenImage21 and prompt embeddings given in place of the Qwen3-VL encoder; the edits with
# seeded condition images, their slots in the embeddings.
PIPELINE_CLASS = QwenImage21Pipeline
SAMPLING_FIXTURES: dict[str, tuple[type, dict]] = {  # see qwen_image
    "text-to-image": (QwenImage21Pipeline, {}),
    "edit": (QwenImage21Pipeline, {}),
    "edit-adjacent": (QwenImage21Pipeline, {}),
}
# --fixture -> its condition images, in sequence order: edit-adjacent's two sit side by side in the embeddings, no
# text between them (two image blocks all the same: FIXTURES' edit-adjacent, DESIGN 11)
CONDITION_IMAGES = {"text-to-image": 0, "edit": 1, "edit-adjacent": 2}
TRUE_CFG_SCALE = 1.0  # QwenImage21Pipeline's default: 2.1 is sampled without guidance
SAMPLE_SIZE = (64, 64)  # pixels: the pipeline's 16x VAE scale, 4 x 4 latent tokens, 2 x 2 image slots
PIXELS_PER_SLOT = 32  # QwenImage21Pipeline.vae_scale_factor (16, fixed) times 2: one image slot's side in pixels
SLOTS_AT = 2  # text positions before the condition images' slots, all valid in both prompts (padding comes after)
# The VAE's class at a tiny size: five stages (4 spatial downsamplings, 16x as the pipeline assumes), no temporal
# ones; RGBA in, as the real VAE and as the pipeline hands it a condition image, RGB out (alpha would only shade the
# charts here).
VAE_CONFIG = dict(base_dim=8, decoder_base_dim=8, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, False, False, False], in_channels=4, out_channels=3)
_SETUP = {
    "kv_cache": "on, as QwenImage21Pipeline's default: step 1 prefills the prefix cache (extract), later steps "
                "decode over it (cached); a failing step is located after replaying, into a fresh cache per run, "
                "every earlier call that used it",
    "text_encoder": "none: prompt embeddings given (text only, no image slots); a stand-in processor answers the "
                    "two look-ups QwenImage21Pipeline.__init__ makes of Qwen3VLProcessor, unused with embeddings",
}
_EDIT_SETUP = {
    "text_encoder": "none: prompt embeddings given, the condition images' slots inserted after their first "
                    f"{SLOTS_AT} text positions (one per 2 x 2 latent tokens, zeros: the transformer puts the "
                    "condition latents there) with the image_pad_mask marking them, handed to the pipeline's own "
                    "encode_prompt in place of the text encoder's (QwenImage21Pipeline.__call__ takes no "
                    "image_pad_mask beside prompt_embeds, and encode_prompt refuses a condition image without one); "
                    "a stand-in processor answers the two look-ups QwenImage21Pipeline.__init__ makes of "
                    "Qwen3VLProcessor",
    "condition_image": "diffusers' QwenImage21Pipeline sizes each condition image to output_resolution squared "
                       "(1024 x 1024) whatever the output; here to the output's area, so that a tiny run stays tiny "
                       "(the same at --size 1024x1024); the seeded RGB image, as the pipeline hands it over (RGBA, in "
                       "the run's dtype), is encoded by the one fp64 VAE (argmax) and its latents cast to the run's "
                       "dtype",
    "stand_in": "QwenImage21Pipeline's encode_prompt handed the embeddings with the condition images' slots (its "
                "__call__ takes no image_pad_mask)",
}


def sampling_setup(fixture: str) -> dict[str, str]:
    """What a run records beside verify.checks.sampling's own setup: the cache, the absent text encoder, the
    condition images."""
    return _SETUP | (_EDIT_SETUP if CONDITION_IMAGES[fixture] else {})


def build_vae(config: dict, seed: int) -> AutoencoderKLQwenImage21:
    """The seeded tiny VAE, in fp64, its latent channels the transformer's: every run decodes through it."""
    channels = config["in_channels"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 4)
        vae = AutoencoderKLQwenImage21(**VAE_CONFIG, z_dim=channels, latents_mean=[0.0] * channels,
                                       latents_std=[1.0] * channels)
    return torch.nn.Module.to(vae, torch.float64).eval()


def load_vae(config: dict, weights: dict[str, torch.Tensor]) -> AutoencoderKLQwenImage21:
    """The VAE of a diffusers folder (`sample --vae`: its config.json and tensors), in fp64 as the seeded one."""
    from verify.models.folder import component

    return component(AutoencoderKLQwenImage21, config, weights)


def vae_latent_channels(config: dict) -> int:
    """The latent channels the VAE must have (its z_dim) for the transformer of `config`: one token a latent pixel."""
    return config["in_channels"]


class _Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [0]


class _NoProcessor:
    """Stands in for Qwen3VLProcessor, which QwenImage21Pipeline.__init__ asks for the system prompt's token count
    and the image-pad token's id; both serve only the text encoder, which given prompt embeddings never runs."""

    tokenizer = _Tokenizer()

    def apply_chat_template(self, messages, **kwargs) -> list[list[int]]:
        return [[]]


def sampling_pipeline(transformer: nn.Module, vae: nn.Module, scheduler,
                      fixture: str = "text-to-image") -> QwenImage21Pipeline:
    """diffusers' QwenImage21Pipeline without a text encoder (prompt embeddings are given); for an edit, its
    encode_prompt handed the embeddings with the condition images' slots and their image_pad_mask, and the condition
    images encoded by the fp64 VAE whatever the run's dtype (the pipeline hands the VAE the run's dtype)."""
    pipe = PIPELINE_CLASS(scheduler=scheduler, vae=vae, text_encoder=None, processor=_NoProcessor(),
                          transformer=transformer)
    if CONDITION_IMAGES[fixture]:
        if vae.config.in_channels != 4:
            raise VerifyError(f"--fixture {fixture}: QwenImage21Pipeline hands the VAE its condition images as RGBA, "
                              f"but the VAE reads {vae.config.in_channels} channels (its in_channels)")
        encode_image, encode_prompt = pipe._encode_vae_image, pipe.encode_prompt
        pipe._encode_vae_image = lambda image, generator: encode_image(image.to(vae.dtype), generator).to(image.dtype)
        pipe.encode_prompt = lambda image, prompt_embeds, prompt_embeds_mask, **kwargs: encode_prompt(
            image=image, **image_slots(prompt_embeds, prompt_embeds_mask, image), **kwargs)
    return pipe


def image_slots(prompt_embeds: torch.Tensor, prompt_embeds_mask: torch.Tensor, images: list[Image.Image]) -> dict:
    """What the text encoder would hand encode_prompt beside the condition images: the embeddings [B, L, C] with
    one slot per 2 x 2 latent tokens of each (resized) image inserted after SLOTS_AT text positions, valid in the
    mask, and the image_pad_mask [B, L + slots] marking them."""
    slots = sum(w * h for w, h in (image.size for image in images)) // PIXELS_PER_SLOT ** 2
    B, _, C = prompt_embeds.shape
    embeds = torch.cat([prompt_embeds[:, :SLOTS_AT], prompt_embeds.new_zeros(B, slots, C),
                        prompt_embeds[:, SLOTS_AT:]], dim=1)
    mask = torch.cat([prompt_embeds_mask[:, :SLOTS_AT], prompt_embeds_mask.new_ones(B, slots),
                      prompt_embeds_mask[:, SLOTS_AT:]], dim=1)
    image_pad_mask = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    image_pad_mask[:, SLOTS_AT:SLOTS_AT + slots] = True
    return dict(prompt_embeds=embeds, prompt_embeds_mask=mask, image_pad_mask=image_pad_mask)


@contextmanager
def sampling_context(fixture: str, height: int, width: int):
    """While the pipeline runs: each condition image sized to the output's area (1024 x 1024 in diffusers, whatever
    the output), through the pipeline module's own calculate_dimensions."""
    size_of = pipeline_qwenimage21.calculate_dimensions
    with mock.patch.object(pipeline_qwenimage21, "calculate_dimensions",
                           lambda _area, ratio: size_of(height * width, ratio)):
        yield


def condition_inputs(fixture: str, size: tuple[int, int], seed: int) -> dict:
    """The pipeline's keyword arguments of `fixture` beside the prompt: its condition images, seeded RGB pixels of
    the output's size (each of its own seed)."""
    images = [Image.fromarray(np.random.default_rng(seed + 8 + i).integers(0, 256, (*size, 3), dtype=np.uint8))
              for i in range(CONDITION_IMAGES[fixture])]
    return {"image": images} if images else {}


def sample_tokens(height: int, width: int) -> int:
    """Latent tokens of a `height` x `width` image, or VerifyError where the pipeline would round the size down."""
    if height % PIXELS_PER_SLOT or width % PIXELS_PER_SLOT:
        raise VerifyError(f"--size {height}x{width}: each side must be a multiple of {PIXELS_PER_SLOT} for "
                          f"qwen-image-2.1 (the pipeline's 16x VAE scale, then 2 x 2 latent tokens per image slot)")
    return (height // 16) * (width // 16)


def prompt_embeddings(config: dict, seed: int, text_len: int = 8) -> dict:
    """Seeded prompt and negative-prompt embeddings of one length with different padding (bool masks, as the
    pipeline's), text only: an edit's image slots are inserted where encode_prompt receives them (image_slots)."""
    g = torch.Generator().manual_seed(seed + 6)
    width = config["context_in_dim"]
    mask, negative_mask = (torch.ones(1, text_len, dtype=torch.bool) for _ in range(2))
    mask[0, -2:], negative_mask[0, -(text_len // 2 + 1):] = False, False
    return dict(prompt_embeds=torch.randn(1, text_len, width, generator=g, dtype=torch.float64),
                prompt_embeds_mask=mask,
                negative_prompt_embeds=torch.randn(1, text_len, width, generator=g, dtype=torch.float64),
                negative_prompt_embeds_mask=negative_mask)


def replay_caches(transformer: nn.Module, history: list[dict], calls: list[dict], cast) -> list[dict]:
    """`calls` (one step's model calls, as the oracle made them) with each prefix KV cache they use replaced by a
    fresh one, filled by `transformer` replaying (inputs through `cast`) every earlier call of `history` that used
    the same cache: the first step's extract, and the cached calls after it, which diffusers' never write but a
    candidate's might. Each of oracle, base and cand then decodes from its own cache, as in its own run."""
    fresh: dict[int, QwenImage21KVCache] = {}
    replayed = []
    for kwargs in calls:
        cache = kwargs.get("kv_cache")
        if cache is not None:
            if id(cache) not in fresh:
                fresh[id(cache)] = QwenImage21KVCache(len(cache.layer_caches))
                with torch.no_grad():
                    for earlier in (c for c in history if c.get("kv_cache") is cache):
                        transformer(**cast(earlier | {"kv_cache": fresh[id(cache)]}))
            kwargs = kwargs | {"kv_cache": fresh[id(cache)]}
        replayed.append(kwargs)
    return replayed



# Bench (verify.bench): one block at a bench width, seeded and built on the device in the bench's dtype, its inputs
# for a text-to-image prefill (causal text, then one target image that sees everything; no padding), its matmul
# FLOPs, what its output is and where a LoRA goes.
BENCH_OUTPUTS = {"joint": "hidden_states"}  # the block's output -> the input of that shape (whose gradient is judged)
BENCH_LORA_TARGETS = {"standard": ("to_q", "to_k", "to_v"), "merged": ("to_qkv",), "out": ("to_out.0",)}


def bench_block(config: dict, seed: int, device: str, dtype: torch.dtype) -> QwenImage21TransformerBlock:
    """A standard block with seeded weights, built on `device` and cast to `dtype` (never fp64 on the way)."""
    from verify.models.seeded import randomise_norms

    torch.manual_seed(seed)
    with torch.device(device):
        block = QwenImage21TransformerBlock(
            dim=config["num_attention_heads"] * config["attention_head_dim"],
            num_attention_heads=config["num_attention_heads"], attention_head_dim=config["attention_head_dim"],
            mlp_ratio=config.get("mlp_ratio", 3))
    randomise_norms(block, seed)
    return nn.Module.to(block, dtype=dtype).eval()


def bench_inputs(config: dict, grid: tuple[int, int], text_tokens: int, batch: int, seed: int, device: str,
                 dtype: torch.dtype) -> dict:
    """Seeded inputs (standard normal) of one block's prefill: `text_tokens` text tokens, then a target image of `grid`
    (height, width) latent tokens; the block-causal structure as diffusers' model derives it (one causal text segment),
    the modulation rows of the target's timestep and of t = 0 (causal_condition)."""
    g = torch.Generator(device=device).manual_seed(seed + math.prod(grid))
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    where = torch.device(device)
    image = torch.arange(text_tokens + math.prod(grid), device=where) >= text_tokens
    image_ids, target = QwenImage21Transformer2DModel.build_token_metadata(image, [(1, *grid)])
    rope = QwenImage21Rope(theta=10000, axes_dim=list(config["axes_dims_rope"]))
    return dict(
        hidden_states=torch.randn(batch, image.shape[0], dim, generator=g, device=where, dtype=dtype),
        modulation=torch.randn(batch + 1, 4 * dim, generator=g, device=where, dtype=dtype),
        rotary_emb=rope([(1, *grid)], image, device=where),
        target_token_mask=target,
        segments=_qwenimage21_prefix_segments(image_ids, text_tokens),
        key_valid=None,
    )


def bench_flops(config: dict, image_tokens: int, text_tokens: int) -> tuple[float, float]:
    """One sample's forward FLOPs of the block's matrix multiplies: (linear layers, attention's two products).
    q, k, v, out: 8 S d^2; the SwiGLU MLP (three d x 3d): 18 S d^2, over the joint sequence S; attention as the
    prefill issues it: the text segment's T x T (its causal mask does not skip work), the image's N x (T + N)."""
    d, n, t = config["num_attention_heads"] * config["attention_head_dim"], image_tokens, text_tokens
    mlp = 3 * 2 * config.get("mlp_ratio", 3)
    return (8 + mlp) * (n + t) * d * d, 4 * d * (t * t + n * (t + n))


def bench_sequence(inputs: dict) -> list[tuple[torch.Tensor, int]]:
    """The (tensor, dim) of the inputs that grow with the image tokens (compiled as one symbol)."""
    return [(inputs["hidden_states"], 1), (inputs["rotary_emb"], 0), (inputs["target_token_mask"], 0)]


# The whole model (verify.bench.full_model, --full-model): built in the bench's dtype directly on the device, its
# inputs for a text-to-image prefill as model_inputs lays them out, its matmul FLOPs.
BENCH_FULL_MODEL_TOKENS = TOKENS_PER_SLOT  # --full-model's target image fills whole image slots of 2 x 2 tokens


def bench_full_model(config: dict, seed: int, device: str, dtype: torch.dtype) -> QwenImage21Transformer2DModel:
    """The whole model of `config` with seeded weights, built in `dtype` directly on `device` (never fp32 or fp64 on
    the way)."""
    return seeded_on(QwenImage21Transformer2DModel, config, seed, device, dtype)


def bench_full_model_inputs(config: dict, grid: tuple[int, int], text_tokens: int, batch: int, seed: int, device: str,
                            dtype: torch.dtype) -> dict:
    """Seeded inputs (standard normal) of the whole model's text-to-image prefill, laid out as model_inputs lays out
    an InputSpec's: `text_tokens` of text, then the target image of `grid` (height, width) latent tokens, its slots
    marked in img_mask; no text padding (pipelines pass None)."""
    spec = InputSpec(batch=batch, text_len=text_tokens, target=grid)
    g = torch.Generator(device=device).manual_seed(seed + math.prod(grid))

    def randn(*shape):
        return torch.randn(shape, generator=g, device=device, dtype=dtype)

    return dict(hidden_states=randn(batch, spec.target_tokens, config["in_channels"]),
                encoder_hidden_states=randn(batch, text_tokens, config["context_in_dim"]),
                encoder_hidden_states_mask=None, timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
                img_shapes=spec.img_shapes(), img_mask=spec.img_mask().to(device))


def bench_full_model_flops(config: dict, image_tokens: int, text_tokens: int) -> float:
    """One sample's forward FLOPs of the whole model's matrix multiplies: every block's (bench_flops), img_in, txt_in's
    two layers, and proj_out over the joint sequence (diffusers projects every token); the time embedding, the
    shared modulation and norm_out's scale (a few rows per sample) are negligible."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    patch = config["patch_size"] ** 2
    out = patch * (config.get("out_channels") or config["in_channels"])
    edges = 2 * (image_tokens * patch * config["in_channels"] * d + text_tokens * (config["context_in_dim"] + d) * d
                 + (image_tokens + text_tokens) * d * out)
    return config["num_layers"] * sum(bench_flops(config, image_tokens, text_tokens)) + edges
