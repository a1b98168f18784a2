"""LoRA files for Qwen-Image, standard or merged QKV: read them, say what they do, convert and apply them exactly."""
