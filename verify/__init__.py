"""qkv-verify: prove or disprove that a merged-QKV Qwen-Image transformer computes the standard model's function.

The public API, stable whatever the layout of the package (imported on first use, so `qkv-verify --help` and
`import verify` stay light):

- `fuse_model(model, naming="seed", layout="blocked", processor=None)`, `unfuse_model(model)`: in place, PEFT LoRA
  adapters carried exactly; `load_merged(DIR, layout=None, dtype=None)`: a saved merged model;
  `load_lora(model, FILE, adapter_name="default")`: a LoRA file as exact PEFT adapters on either model.
- `check_candidate(spec, ...)`, `assert_candidate(spec, ...)`: judge your own implementation (verify.testing).
- `resolve(spec)`: a SPEC's Implementation; `VerifyError`: bad input, said in one line.
"""

__version__ = "0.1.0"

_API = {
    "fuse_model": "verify.implementations.fused", "unfuse_model": "verify.implementations.fused",
    "load_merged": "verify.implementations.loading", "load_lora": "verify.implementations.lora",
    "check_candidate": "verify.testing", "assert_candidate": "verify.testing",
    "resolve": "verify.implementations.candidate", "VerifyError": "verify.errors",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'verify' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_API[name]), name)
