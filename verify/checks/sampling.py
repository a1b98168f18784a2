"""A sampling run judged step by step against an fp64 oracle.

diffusers' own pipeline runs three times from the same noise, prompt embeddings and scheduler: the oracle (the
reference in fp64, its scheduler step in fp64 too), base (the reference in each tested dtype) and cand (the candidate
in each tested dtype). The latents after every step are judged by the relative-to-base rule (verify.checks.compare),
the first step where cand leaves the bound is located inside that step's model calls (verify.checks.divergence), and
every run's final latents are decoded by one fp64 VAE, so that the images differ only where the latents do. The
weights are seeded, or a checkpoint's loaded whole in fp64 (the candidate's from the user's merged checkpoint, split
back, when given); the VAE is seeded and tiny, or the user's folder.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from verify import models
from verify.checks.compare import Record, compare
from verify.checks.divergence import first_divergence
from verify.checks.inputs import cast_inputs
from verify.checks.runner import cast_copy, counting, required
from verify.checks.streaming import BLOCKS, SeededSource, StateDictSource, streamed_model
from verify.checks.tolerance import OUTPUTS, dtype_name, floor_dtype
from verify.errors import VerifyError
from verify.files import lora_formats as formats
from verify.files import lora_mapping as mapping
from verify.files.checkpoint import Checkpoint
from verify.implementations.candidate import Implementation, oracle_precision


class Fp64FlowMatchEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """diffusers' flow-matching Euler step, kept in fp64 for fp64 latents (diffusers' own step rounds the sample to
    fp32 first, which would make the oracle an fp32 run); other dtypes and options step as diffusers does."""

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        if sample.dtype != torch.float64 or self.config.stochastic_sampling or args or kwargs:
            return super().step(model_output, timestep, sample, *args, return_dict=return_dict, **kwargs)
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = (self.sigmas[self.step_index + k].double() for k in (0, 1))
        prev = sample + (sigma_next - sigma) * model_output.double()  # x + (sigma_next - sigma) * v
        self._step_index += 1
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)


@dataclass
class Run:
    """One pipeline run: the latents after each step, the transformer's calls (keyword arguments, on the CPU) and
    the decoded image."""

    latents: list[torch.Tensor] = field(default_factory=list)
    calls: list[dict] = field(default_factory=list)
    image: np.ndarray | None = None
    fused_calls: int | None = None


@dataclass(frozen=True)
class SampleOptions:
    """What `qkv-verify sample` was asked to run."""

    model: str = models.DEFAULT_MODEL
    config: str = "tiny"
    fixture: str = "text-to-image"
    steps: int = 20
    true_cfg_scale: float | None = None  # None: the pipeline's default for the model
    size: tuple[int, int] | None = None  # (height, width) in pixels; None: the model's tiny sample size
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    device: str = "cpu"
    seed: int = 0
    lora: Path | None = None  # a LoRA file: its effect on the image beside the implementation's own deviation
    checkpoint: Path | None = None  # a diffusers transformer folder: the standard weights (else seeded `config`)
    merged_checkpoint: Path | None = None  # the user's merged weights: what the candidate builds from, split back
    layout: str = "blocked"  # of merged_checkpoint's fused tensors
    vae: Path | None = None  # a diffusers VAE folder (else a seeded tiny VAE)
    stream: bool = False  # each block's weights held only while it runs (verify.checks.streaming.streamed_model)

    @property
    def streamed(self) -> bool:
        """Whether every run, the oracle included, holds one block's weights at a time, on `device`: asked for, or
        the seeded real width (whose fp64 oracle, about 160 GB whole, fits no card)."""
        return self.stream or (self.config == "full" and self.checkpoint is None)


def run_sampling(candidate: Implementation, reference: Implementation,
                 opts: SampleOptions) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """The oracle, then base and cand in each dtype: (per-step records, final records, image metrics and the run's
    setup; the final images per dtype and role)."""
    module = models.load(opts.model)
    if opts.fixture not in module.SAMPLING_FIXTURES:
        raise VerifyError(f"sample --model {opts.model} --fixture {opts.fixture}: not supported (it samples "
                          f"{', '.join(module.SAMPLING_FIXTURES)})")
    if opts.lora and opts.streamed:
        raise VerifyError("--lora cannot be sampled streamed (--stream, --config full): its sweep merges the LoRA "
                          "into the whole model; sample it at a width whose model fits in memory")
    pipeline_class, overrides = module.SAMPLING_FIXTURES[opts.fixture]
    given_vae = _vae(module, opts.vae) if opts.vae else None  # refused before a transformer is read
    config, subject = _config(module, opts, overrides)
    if given_vae is not None:
        _refuse_unfit_vae(module, config, given_vae, opts)  # before a checkpoint is loaded whole
    vae = given_vae if given_vae is not None else module.build_vae(config, opts.seed)  # built to fit
    standard, merged, weights = _transformers(module, opts, config, subject)
    lora = _lora_plan(opts.lora, standard) if opts.lora else None  # refused before anything runs
    oracle_at = opts.device if opts.streamed else "cpu"  # a streamed oracle runs where the blocks are made
    size = opts.size or module.SAMPLE_SIZE
    cfg = module.TRUE_CFG_SCALE if opts.true_cfg_scale is None else opts.true_cfg_scale
    inputs = _inputs(module, config, size, cfg, opts.seed) | module.condition_inputs(opts.fixture, size, opts.seed)
    ref_model = _built(module, reference, standard, torch.float64, oracle_at, "reference")
    reached = oracle_precision(reference, module.REFERENCE_PRECISION)  # how finely the oracle computes
    oracle = _run(module, ref_model, vae, inputs, opts, torch.float64, oracle_at, None, keep_calls=True)
    shared = {n for n, _ in module.empty_model(config).named_modules() if n}  # the standard model's module names
    trajectory, final, single, images, pictures = [], [], [], [], {}
    for dtype in opts.dtypes:
        base_model = _built(module, reference, standard, dtype, opts.device, "reference")
        cand_model = _built(module, candidate, merged, dtype, opts.device, "candidate")
        same_as_oracle = dtype == torch.float64 and opts.device == oracle_at  # the same computation, run once
        base = oracle if same_as_oracle else _run(module, base_model, vae, inputs, opts, dtype, opts.device, None)
        cand = _run(module, cand_model, vae, inputs, opts, dtype, opts.device, candidate)
        records = [compare(f"step-{i + 1:02d}/latents", "sampling", {"latents": r}, {"latents": c}, OUTPUTS, dtype,
                           opts.device, base={"latents": b}, fused_calls=cand.fused_calls,
                           precision=candidate.precision, reference_precision=reached)
                   for i, (r, b, c) in enumerate(zip(oracle.latents, base.latents, cand.latents))]
        first = next((i for i, r in enumerate(records) if not r.passed), None)
        if first is not None:
            floor = floor_dtype(dtype, candidate.precision, reached)
            records[first].first_divergence = _locate(module, oracle, ref_model, base_model, cand_model, first,
                                                      dtype, (oracle_at, opts.device), floor, shared, cfg > 1,
                                                      opts.streamed)
        trajectory += records
        single.append(_single_pass(module, oracle, reference, candidate, standard, merged, dtype,
                                   (oracle_at, opts.device), reached))
        last = records[-1]
        final.append(Record(**{**last.__dict__, "name": "final/latents"}))
        pictures[dtype_name(dtype)] = {"oracle": oracle.image, "standard": base.image, "merged": cand.image}
        images += [_image_metrics(oracle.image, run.image, role, dtype) for role, run in (("standard", base),
                                                                                           ("merged", cand))]
    setup = {"model": opts.model, "fixture": opts.fixture, "pipeline": pipeline_class.__name__, "steps": opts.steps,
             "true_cfg_scale": cfg, "size": list(size), "seed": opts.seed,
             **_weights_setup(opts), **_streamed_setup(opts),
             "scheduler": "FlowMatchEulerDiscreteScheduler (fp64 runs step in fp64)",
             "vae": f"{opts.vae or 'seeded tiny'} {type(vae).__name__} in fp64, shared by every run",
             **({"vae_folder": str(opts.vae)} if opts.vae else {}),
             **({"transformer_config": overrides} if overrides else {}), **module.sampling_setup(opts.fixture)}
    lora_section = lora_effect(module, candidate, reference, (standard, merged), vae, inputs, opts, lora) \
        if lora else None
    return {"trajectory": [r.to_dict() for r in trajectory], "final": [r.to_dict() for r in final],
            "single_pass": [r.to_dict() for r in single],
            "images": [_image_metrics(oracle.image, oracle.image, "oracle", torch.float64), *images],
            "weights": [r.to_dict() for r in weights], "sampling": setup,
            **({"lora": lora_section} if lora else {})}, pictures


def _config(module, opts: SampleOptions, overrides: dict):
    """The transformer's config: the seeded one's, or --checkpoint's with its weights (and --merged-checkpoint's)
    opened and checked as the report does (verify.checks.report's Subject; None for seeded weights)."""
    if not (opts.checkpoint or opts.merged_checkpoint):
        return module.model_config(opts.config, **overrides), None
    from verify.checks.report import Options, weights_subject

    subject = weights_subject(Options(checkpoint=opts.checkpoint, merged_checkpoint=opts.merged_checkpoint,
                               layout=opts.layout, device=opts.device), opts.model)
    config = subject.std.config
    differ = {k: v for k, v in overrides.items() if config.get(k) != v}
    if differ:  # the fixture's model (Qwen-Image-Edit-2511's zero_cond_t) is not the checkpoint's
        raise VerifyError(f"--fixture {opts.fixture} samples a model with "
                          f"{', '.join(f'{k}={v}' for k, v in differ.items())}; {config.path} has "
                          f"{', '.join(f'{k}={config.get(k)}' for k in differ)}")
    return config, subject


def _refuse_unfit_vae(module, config: dict, vae: nn.Module, opts: SampleOptions) -> None:
    """VerifyError when --vae cannot decode the transformer's latents (its z_dim is not their channels)."""
    channels = module.vae_latent_channels(config)
    if vae.config.z_dim != channels:
        source = opts.checkpoint or f"the seeded {opts.config} config"
        raise VerifyError(f"--vae {opts.vae} has z_dim {vae.config.z_dim}, but the transformer of {source} "
                          f"(in_channels {config['in_channels']}) samples latents of {channels} channels")


Weights = nn.Module | StateDictSource  # a whole fp64 model, or where a streamed model reads its blocks


def _transformers(module, opts: SampleOptions, config: dict, subject) -> tuple[Weights, Weights, list[Record]]:
    """The standard weights, those the candidate builds from (the same, or --merged-checkpoint's split back in
    --layout), each a whole fp64 model or, streamed, a source of blocks; and the records of the checkpoints' weights
    (finite, the merged weights split equal to the standard ones)."""
    if subject is not None:
        std, cand = subject.std, subject.cand or subject.std
        if opts.streamed:
            return std, cand, subject.weight_checks
        standard = _whole(module, std)
        return standard, _whole(module, cand) if subject.cand else standard, subject.weight_checks
    if opts.config == "full":  # generated per tensor on the device, as the report's real width is
        source = SeededSource(config, opts.seed, opts.device, opts.model)
        return source, source, []
    standard = module.build_model(config, opts.seed)
    if opts.streamed:
        standard = StateDictSource(standard.state_dict(), config)
    return standard, standard, []


def _whole(module, source: StateDictSource) -> nn.Module:
    """The whole standard model in fp64 from a checkpoint's weights (a merged one's fused projections split back)."""
    state = source.top() | {f"{BLOCKS}{i}.{k}": v for i in range(source.config["num_layers"])
                            for k, v in source.standard_block(i).items()}
    model = module.empty_model(source.config)
    model.load_state_dict({k: v.to(torch.float64) for k, v in state.items()}, strict=True, assign=True)
    return nn.Module.to(model, torch.float64).eval()


def _vae(module, path: Path) -> nn.Module:
    """The model's VAE from a diffusers folder: its config.json and safetensors read as a checkpoint's are."""
    if not path.is_dir():
        raise VerifyError(f"--vae {path}: no such folder (expected a diffusers VAE folder)")
    if models.config_of(path) is None:
        raise VerifyError(f"--vae {path}: no config.json holding a JSON object (expected a diffusers VAE folder)")
    ckpt = Checkpoint(path)
    try:
        return module.load_vae(ckpt.config, ckpt.state_dict())
    except VerifyError as e:
        raise VerifyError(f"--vae {path}: {e}") from None


def _streamed_setup(opts: SampleOptions) -> dict:
    """How the weights were held, for summary.json's sampling: whole, or streamed (and where the oracle ran)."""
    if not opts.streamed:
        return {"streamed": None, "oracle_device": "cpu"}
    return {"streamed": "every run, the fp64 oracle included, holds one block's weights at a time: read (or "
                        "generated) and built by its implementation again before each model call",
            "oracle_device": opts.device}


def _weights_setup(opts: SampleOptions) -> dict:
    """Where the transformer's weights came from, for summary.json's sampling."""
    if not opts.checkpoint:
        return {"config": opts.config}
    merged = {"merged_checkpoint": str(opts.merged_checkpoint), "layout": opts.layout} if opts.merged_checkpoint \
        else {}
    return {"config": None, "checkpoint": str(opts.checkpoint), **merged}


def _single_pass(model, oracle: Run, reference: Implementation, candidate: Implementation, standard: Weights,
                 merged: Weights, dtype: torch.dtype, devices: tuple[str, str], reached: str | None) -> Record:
    """Step 1's first model call alone, by freshly built models on the oracle's inputs: the error that one forward
    pass shows, beside which the per-step records show how the error grows over the steps (informational: the
    trajectory decides the verdict)."""
    (oracle_at, device), sides = devices, {}
    for role, impl, weights, d, where in (("ref", reference, standard, torch.float64, oracle_at),
                                          ("base", reference, standard, dtype, device),
                                          ("cand", candidate, merged, dtype, device)):
        transformer = _built(model, impl, weights, d, where, "candidate" if role == "cand" else "reference")
        cast = lambda kwargs, d=d, where=where: cast_inputs(kwargs, d, where)  # noqa: E731
        kwargs = cast(model.replay_caches(transformer, [], oracle.calls[:1], cast)[0]) | {"return_dict": False}
        with torch.no_grad(), counting(transformer, impl.fused_modules) as calls:
            sides[role] = {"sample": transformer(**kwargs)[0]}
        fused_calls = calls()
    return compare("single-pass/sample", "sampling", sides["ref"], sides["cand"], OUTPUTS, dtype, device,
                   base=sides["base"], fused_calls=fused_calls, precision=candidate.precision,
                   reference_precision=reached)


def _lora_plan(path: Path, standard: nn.Module) -> mapping.Plan:
    """The LoRA file planned onto the standard model; refused when any of its modules lands nowhere (an image
    judged with a LoRA half applied would answer the wrong question)."""
    plan = mapping.plan(formats.read(path), mapping.spec_of(standard))
    if plan.unmatched:
        raise VerifyError(f"--lora {path}: {len(plan.unmatched)} of its modules match no module of the model (e.g. "
                          f"{plan.unmatched[0]!r}); `qkv-verify lora-audit {path}` lists them")
    return plan


def lora_effect(module, candidate: Implementation, reference: Implementation, standards: tuple[nn.Module, nn.Module],
                vae: nn.Module, inputs: dict, opts: SampleOptions, plan: mapping.Plan) -> dict:
    """The LoRA's effect on the final fp32 image at each factor of the report's sweep (|standard with it - standard
    without|) beside the implementation's own deviation at that factor (|merged - standard|), mean absolute on 0-255:
    their ratio says whether the LoRA's effect shows above the merged path's noise. The LoRA is merged into the
    standard weights (W + factor * m * B @ A) that each implementation builds from (the candidate's: those of
    --merged-checkpoint, split back, when given)."""
    from verify.checks.report import SWEEP_FACTORS

    rows, without = [], None
    for factor in SWEEP_FACTORS:
        scaled = dataclasses.replace(plan, updates=[
            dataclasses.replace(u, factors=dataclasses.replace(u.factors, scale=factor * u.factors.scale))
            for u in plan.updates])
        base, cand = (_run(module, _built(module, impl, _updated(weights, scaled), torch.float32, opts.device, role),
                           vae, inputs, opts, torch.float32, opts.device, impl if role == "candidate" else None).image
                      for role, impl, weights in (("reference", reference, standards[0]),
                                                  ("candidate", candidate, standards[1])))
        without = base if without is None else without  # factor 0 comes first: the image without the LoRA
        effect, deviation = (float(np.abs(a - b).mean() * 255) for a, b in ((base, without), (cand, base)))
        rows.append({"factor": factor, "effect_mean_abs": effect, "deviation_mean_abs": deviation,
                     "effect_over_deviation": effect / deviation if deviation else None})
    scales = sorted({u.factors.scale for u in plan.updates})
    return {"file": str(opts.lora), "modules_matched": len(plan.matched), "scales": scales, "dtype": "fp32",
            "applied": "merged into the standard weights both implementations build from", "sweep": rows}


def _updated(standard: nn.Module, plan: mapping.Plan) -> nn.Module:
    """A copy of `standard` with the planned LoRA merged into its weights."""
    updated = copy.deepcopy(standard)
    mapping.apply(updated, plan)
    return updated


def _inputs(module, config: dict, size: tuple[int, int], cfg: float, seed: int) -> dict:
    """The pipeline's keyword arguments shared by every run: embeddings, the initial noise (packed latents)."""
    embeddings = module.prompt_embeddings(config, seed)
    if cfg <= 1:
        embeddings = {k: v for k, v in embeddings.items() if not k.startswith("negative")}
    height, width = size
    tokens = module.sample_tokens(height, width)
    g = torch.Generator().manual_seed(seed + 7)
    noise = torch.randn(1, tokens, config["in_channels"], generator=g, dtype=torch.float64)
    return embeddings | {"latents": noise, "height": height, "width": width, "true_cfg_scale": cfg}


def _built(module, impl: Implementation, weights: Weights, dtype: torch.dtype, device: str, role: str) -> nn.Module:
    """impl's model (or the standard's with impl's blocks) from a copy of the whole `weights` in `dtype` on `device`;
    from a source, the standard model with impl's blocks, streamed."""
    if isinstance(weights, StateDictSource):
        return streamed_model(module, weights, impl, dtype, device, role)
    return required(impl, cast_copy(weights, dtype, device), "model", role, "a sampling run needs one (or its blocks)")


def _run(module, transformer: nn.Module, vae: nn.Module, inputs: dict, opts: SampleOptions, dtype: torch.dtype,
         device: str, impl: Implementation | None, keep_calls: bool = False) -> Run:
    """One pipeline run in `dtype` on `device`, its latents after every step and its calls kept on the CPU; fp64
    runs step in fp64 (Fp64FlowMatchEulerScheduler), the others as diffusers does. The fp64 VAE decodes where the
    run's latents are (a copy of it on another device)."""
    run = Run()
    vae = vae if device == "cpu" else nn.Module.to(copy.deepcopy(vae), device=device)
    pipe = module.sampling_pipeline(transformer, vae, Fp64FlowMatchEulerScheduler(), opts.fixture)
    pipe.set_progress_bar_config(disable=True)
    hook = transformer.register_forward_pre_hook(  # the oracle's calls: where a failing step is located
        lambda _m, _a, kwargs: run.calls.append(cast_inputs(kwargs, torch.float64, "cpu")) if keep_calls else None,
        with_kwargs=True)

    def keep(_pipe, _i, _t, tensors):
        run.latents.append(tensors["latents"].detach().to("cpu", torch.float64))
        return {}

    args = cast_inputs({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}, dtype, device)
    try:
        with torch.no_grad(), module.sampling_context(opts.fixture, inputs["height"], inputs["width"]), \
                counting(transformer, impl.fused_modules if impl is not None else ()) as calls:
            out = pipe(**(inputs | args), num_inference_steps=opts.steps, output_type="np",
                       callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"])
    finally:
        hook.remove()
    run.image, run.fused_calls = out.images[0], calls()
    return run


def _locate(model, oracle: Run, ref: nn.Module, base: nn.Module, cand: nn.Module, step: int, dtype: torch.dtype,
            devices: tuple[str, str], floor: torch.dtype, shared: set[str], cfg: bool, streamed: bool) -> str:
    """Where cand first leaves the bound inside step `step`'s model calls, all three run on the oracle's inputs;
    state kept across steps (2.1's prefix KV cache) is rebuilt first for each by replaying the earlier calls that
    made it (`model.replay_caches`), outside what is compared. Streamed models are searched in two passes so that
    no more than one block's submodule outputs are held: the first block (or non-block module) that leaves the
    bound, then the first submodule inside it."""
    per_step = 2 if cfg else 1
    history, step_calls = oracle.calls[:step * per_step], oracle.calls[step * per_step:(step + 1) * per_step]
    oracle_at, device = devices

    def search(watched, names: set[str]) -> str | None:
        """first_divergence over the step's calls, replayed from fresh caches (a candidate's decode may write into
        the cache it used), watching the modules `watched(model)` holds."""
        views, runs = [], {}
        for module, d in ((ref, torch.float64), (base, dtype), (cand, dtype)):
            where = oracle_at if module is ref else device
            cast = lambda kwargs, d=d, where=where: cast_inputs(kwargs, d, where)  # noqa: E731
            views.append(watched(module))
            runs[id(views[-1])] = module, [cast(kwargs) for kwargs in
                                           model.replay_caches(module, history, step_calls, cast)]

        def forward(view: nn.Module, _dtype: torch.dtype) -> None:
            module, calls = runs[id(view)]
            for kwargs in calls:
                module(**kwargs)

        return first_divergence(*views, forward, dtype, names, floor)

    if not streamed:
        where = search(lambda module: module, shared)
    else:
        where = search(_outline, {n for n in shared if "." not in n or n[len(BLOCKS):].isdigit()})
        if where:
            outer = where.split(" (call ")[0]
            where = search(lambda module: _inside(module, outer), shared) or where
    return f"step {step + 1}: {where}" if where else f"step {step + 1} (no submodule named by the standard model)"


class _Watched(nn.Module):
    """Modules under their names in a model, and no others: what first_divergence hooks (every module named_modules
    yields)."""

    def __init__(self, named: dict[str, nn.Module]):
        super().__init__()
        object.__setattr__(self, "named", named)  # a plain attribute: nothing registered as a child

    def named_modules(self, *args, **kwargs):
        yield from self.named.items()


def _inside(model: nn.Module, name: str) -> _Watched:
    """Every submodule of the model's module `name`, under its name in the model."""
    return _Watched({f"{name}.{n}": m for n, m in model.get_submodule(name).named_modules() if n})


def _outline(model: nn.Module) -> _Watched:
    """The model's non-block modules and its blocks, each whole (none of their submodules)."""
    top = {n: m for n, m in model.named_children() if n != BLOCKS.rstrip(".")}
    return _Watched(top | {f"{BLOCKS}{i}": b for i, b in enumerate(model.transformer_blocks)})


def _image_metrics(reference: np.ndarray, image: np.ndarray, role: str, dtype: torch.dtype) -> dict:
    """PSNR and SSIM of `image` against the oracle's image (pixels in [0, 1]), and its pixel mean on 0-255."""
    ref, img = (torch.from_numpy(np.ascontiguousarray(x)).double().permute(2, 0, 1)[None] for x in (reference, image))
    exact = bool(torch.equal(ref, img))
    return {"dtype": dtype_name(dtype), "implementation": role,
            "psnr_db": None if exact else float(peak_signal_noise_ratio(img, ref, data_range=1.0)),
            "ssim": float(structural_similarity_index_measure(img, ref, data_range=1.0)),
            "pixel_mean": float(image.mean() * 255), "max_abs_pixel_err": float((img - ref).abs().max() * 255)}


WRITE_UP_MEAN = "Base model inference: Works perfectly (Mean: 203.98, same as standard)"


def mean_claim(result: dict) -> dict:
    """The write-up's claim judged on the image: the pixel means and PSNR of merged and standard side by side, but
    confirmed only when the trajectory follows the oracle at every step (two images can share a mean and differ
    everywhere)."""
    by = {(i["dtype"], i["implementation"]): i for i in result["images"]}
    rows = [{"dtype": d, "standard_mean": by[(d, "standard")]["pixel_mean"], "merged_mean": i["pixel_mean"],
             "standard_psnr_db": by[(d, "standard")]["psnr_db"], "merged_psnr_db": i["psnr_db"]}
            for (d, role), i in by.items() if role == "merged"]
    means_agree = all(abs(r["merged_mean"] - r["standard_mean"]) < 0.5 for r in rows)
    first = next((r for r in result["trajectory"] if not r["passed"]), None)
    if first is None:
        verdict = "confirmed"
        why = "every step of every dtype follows the oracle within the rule (the means agreeing is not the evidence)"
    else:
        verdict = "refuted"
        why = (f"the trajectory leaves the bound at {first['name']} [{first['dtype']}] although the pixel means "
               f"{'agree within half a grey level' if means_agree else 'differ too'}")
    return {"id": "mean-same-as-standard", "claim": WRITE_UP_MEAN, "verdict": verdict, "why": why,
            "oracle_mean": by[("fp64", "oracle")]["pixel_mean"], "measured": rows}
