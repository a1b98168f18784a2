"""File formats: checkpoint reading, a checkpoint's config.json (model_config), the manifest, checkpoint conversion
(convert), LoRA file formats and key mapping, the safe destination. Imports verify.maths (and verify.errors) only."""
