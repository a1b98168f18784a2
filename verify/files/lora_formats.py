"""LoRA files (safetensors only) read into normalised pairs: module path, A, B, alpha, and the format they came in."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from verify.errors import VerifyError
from verify.files.checkpoint import read_header
from verify.files.folder import write_file

# (key prefix, format, path is flattened with underscores); the first that matches wins.
PREFIXES = (
    ("lora_unet_", "kohya", True),
    ("lora_te", "kohya", True),  # kohya text encoder keys (lora_te_, lora_te1_): never the transformer's
    ("diffusion_model.", "comfyui", False),
    ("base_model.model.", "peft", False),
    ("transformer.", "diffusers", False),
    ("", None, False),
)
# key suffix -> (role, format it implies when the prefix does not say)
SUFFIXES = {
    ".lora_A.default.weight": ("A", "diffsynth"),
    ".lora_B.default.weight": ("B", "diffsynth"),
    ".lora_A.weight": ("A", "diffusers"),
    ".lora_B.weight": ("B", "diffusers"),
    ".lora_down.weight": ("A", "lightning"),
    ".lora_up.weight": ("B", "lightning"),
    ".alpha": ("alpha", None),
}
# pattern found in a key -> the variant it marks, refused with "not supported"
UNSUPPORTED = {
    r"lora_magnitude_vector|dora_scale": "DoRA", r"hada_": "LoHa", r"lokr_": "LoKr", r"lora_mid": "LoCon",
    r"\.diff(_b)?$": "full-weight diff", r"\.bias$": "LoRA bias", r"lora_embedding": "embedding LoRA",
}
CONFIG_FORMATS = ("diffusers", "peft")  # formats whose scale comes from a PEFT LoraConfig
METADATA_KEY = "lora_adapter_metadata"
PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's lora_alpha when none is given
# the weights file of a LoRA folder: PEFT's save_pretrained, diffusers' save_lora_weights
FOLDER_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
NO_ALPHA = "assumed: no alpha found"


@dataclass(frozen=True)
class Pair:
    """One LoRA module of a file: where it points, its factors, and what the file says about its scale."""

    path: str  # module path without prefix; kohya: dots flattened to underscores (resolved against a model)
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    alpha: float | None
    rslora: bool
    format: str
    keys: tuple[str, ...]  # the file's tensors of this module, alpha included
    flat: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class LoraFile:
    """A LoRA file's pairs, where their alphas came from, and notes for the audit."""

    pairs: list[Pair]
    alpha_source: str  # "alpha keys" | "adapter config" | "metadata" | NO_ALPHA
    warnings: list[str] = field(default_factory=list)

    @property
    def format(self) -> str:
        return "+".join(sorted({p.format for p in self.pairs}))


def read(path: str | Path, adapter_config: str | Path | None = None) -> LoraFile:
    """Read a safetensors LoRA file, or the folder PEFT's save_pretrained (or diffusers' save_lora_weights) writes;
    VerifyError for anything not a supported LoRA (never a partial load)."""
    path = lora_file(path)
    tensors, metadata = read_safetensors(path)
    return parse(tensors, path, *_config(path, metadata, adapter_config))


def parse(tensors: dict[str, torch.Tensor], path: str | Path, config: dict | None = None,
          source: str | None = None) -> LoraFile:
    """LoRA tensors by key (a file's, or made in memory) -> LoraFile; `path` names them in errors, `config` is the
    PEFT LoraConfig that applies (from `source`)."""
    modules: dict[tuple[str, bool], dict[str, tuple[str, torch.Tensor]]] = {}  # (name, flat) -> role -> key, tensor
    module_format: dict[tuple[str, bool], str] = {}
    for key, tensor in tensors.items():
        _refuse_unsupported(key)
        prefix_format, flat, rest = _prefix(key)
        suffix = next((s for s in SUFFIXES if rest.endswith(s)), None)
        if suffix is None:
            raise VerifyError(f"{path}: key {key!r} is not a LoRA A/B/alpha tensor: variant not supported")
        role, suffix_format = SUFFIXES[suffix]
        module = (rest[: -len(suffix)], flat)
        if role in modules.setdefault(module, {}):
            raise VerifyError(f"{path}: {modules[module][role][0]!r} and {key!r} are the same tensor of one module")
        modules[module][role] = (key, tensor)
        if prefix_format or suffix_format:
            module_format.setdefault(module, prefix_format or suffix_format)
    pairs = [_pair(path, name, module_format.get((name, flat)), flat, parts, config)
             for (name, flat), parts in modules.items()]
    if not pairs:
        raise VerifyError(f"{path}: no LoRA tensors found")
    return _with_scale_notes(pairs, source, config)


def lora_file(path: str | Path) -> Path:
    """The safetensors file of a LoRA given as that file or as the folder holding it (with adapter_config.json)."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = [path / name for name in FOLDER_FILES if (path / name).is_file()]
    if len(found) > 1:
        raise VerifyError(f"{path}: holds both {found[0].name} and {found[1].name}; pass the file you mean")
    if found:
        return found[0]
    if (path / "adapter_model.bin").is_file():
        raise VerifyError(f"{path}: holds adapter_model.bin, a pickle, which is never loaded; save the adapter with "
                          "safe_serialization=True (adapter_model.safetensors)")
    raise VerifyError(f"{path}: a folder without {' or '.join(FOLDER_FILES)} (what PEFT's save_pretrained and "
                      "diffusers' save_lora_weights write)")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, after validating its header; never unpickles."""
    read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises several types for malformed files
        raise VerifyError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Save safetensors atomically (verify.files.folder.write_file: renamed over `path` only once complete)."""
    write_file(path, save({k: t.contiguous() for k, t in tensors.items()}, metadata=metadata))


def _refuse_unsupported(key: str) -> None:
    for pattern, variant in UNSUPPORTED.items():
        if re.search(pattern, key):
            raise VerifyError(f"key {key!r}: {variant} is not supported (refusing a partial load)")


def _prefix(key: str) -> tuple[str | None, bool, str]:
    for prefix, fmt, flat in PREFIXES:
        if key.startswith(prefix):
            return fmt, flat, key[len(prefix) :]
    raise AssertionError("the empty prefix always matches")


def _pair(path: Path, name: str, fmt: str | None, flat: bool, parts: dict, config: dict | None) -> Pair:
    if "A" not in parts or "B" not in parts:
        have = ", ".join(key for key, _ in parts.values())
        raise VerifyError(f"{path}: module {name!r} lacks its {'B' if 'A' in parts else 'A'} tensor (has {have})")
    (a_key, A), (b_key, B) = parts["A"], parts["B"]
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        shapes = f"A {tuple(A.shape)} and B {tuple(B.shape)}"
        raise VerifyError(f"{path}: module {name!r} has {shapes}, not (r, in) and (out, r)")
    keys = (a_key, b_key)
    alpha, rslora = None, False
    if "alpha" in parts:
        keys += (parts["alpha"][0],)
        alpha = float(parts["alpha"][1].double().reshape(-1)[0])
    if config is not None and fmt in CONFIG_FORMATS:
        alpha, rslora = _config_alpha(config, name, A.shape[0])
    return Pair(name, A, B, alpha, rslora, fmt, keys, flat)


def _config(path: Path, metadata: dict, explicit: str | Path | None) -> tuple[dict | None, str | None]:
    """The PEFT LoraConfig that applies: --adapter-config, else the file's metadata, else adapter_config.json beside."""
    if explicit is not None:
        return _load_json(Path(explicit)), "adapter config"
    if METADATA_KEY in metadata:
        try:
            config = json.loads(metadata[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise VerifyError(f"{path}: metadata {METADATA_KEY!r} is not JSON ({e})") from None
        if any("." in k for k in config):  # a pipeline's save_lora_weights packs one config per model: "transformer.r"
            config = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
            if not config:
                return None, None
        return _check_config(config, f"{path} metadata"), "metadata"
    beside = path.with_name("adapter_config.json")
    if beside.is_file():
        return _load_json(beside), "adapter config"
    return None, None


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise VerifyError(f"{path}: no such adapter config")
    try:
        return _check_config(json.loads(path.read_text()), str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VerifyError(f"{path}: adapter config is not JSON ({e})") from None


def _check_config(config: dict, where: str) -> dict:
    if not isinstance(config, dict) or "lora_alpha" not in config or "r" not in config:
        raise VerifyError(f"{where}: not a PEFT LoraConfig (needs 'r' and 'lora_alpha')")
    if config.get("use_dora"):
        raise VerifyError(f"{where}: DoRA (use_dora) is not supported (refusing a partial load)")
    if config.get("lora_bias"):
        raise VerifyError(f"{where}: LoRA bias (lora_bias) is not supported (refusing a partial load)")
    return config


def _pattern(patterns: dict, name: str):
    """PEFT's rule (peft.utils.other.get_pattern_key): the first key k with re.match(rf'(.*\\.)?({k})$', name)."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", name)), None)


def _config_alpha(config: dict, name: str, rank: int) -> tuple[float, bool]:
    r = _pattern(config.get("rank_pattern") or {}, name) or config["r"]
    alpha = _pattern(config.get("alpha_pattern") or {}, name) or config["lora_alpha"]
    if r != rank:
        raise VerifyError(f"module {name!r}: the adapter config says rank {r}, the file's tensors have rank {rank}")
    return float(alpha), bool(config.get("use_rslora", False))


def _with_scale_notes(pairs: list[Pair], source: str | None, config: dict | None) -> LoraFile:
    has_alpha_keys = any(len(p.keys) == 3 for p in pairs)
    by_config = config is not None and any(p.format in CONFIG_FORMATS for p in pairs)
    warnings = []
    if by_config and has_alpha_keys:
        warnings.append(f"alpha keys present but ignored: PEFT scales by the {source}'s lora_alpha / r")
    if by_config:
        alpha_source = source
    elif has_alpha_keys:
        alpha_source = "alpha keys"
    else:
        alpha_source = NO_ALPHA
        peft_saved = sorted({p.format for p in pairs if p.format in CONFIG_FORMATS})
        if peft_saved:  # kohya, Lightning and ComfyUI files without .alpha mean scale 1; DiffSynth ignores alpha
            ranks = sorted({p.rank for p in pairs if p.format in CONFIG_FORMATS})
            would = ", ".join(f"8/{r} = {PEFT_DEFAULT_ALPHA / r:g}" for r in ranks)
            warnings.append(
                f"scale 1 assumed: no alpha found; PEFT's default lora_alpha is {PEFT_DEFAULT_ALPHA}, which would give "
                f"{PEFT_DEFAULT_ALPHA}/r ({would}): this {'+'.join(peft_saved)} LoRA keeps its alpha in "
                f"adapter_config.json beside it or in its {METADATA_KEY} metadata and has neither; pass "
                "--adapter-config with the LoraConfig it was trained with")
    return LoraFile(pairs, alpha_source, warnings)
