"""qkv-verify: prove or disprove that a merged-QKV Qwen-Image transformer computes the standard model's function."""

__version__ = "0.1.0"
