"""File formats: checkpoint reading, a checkpoint's config.json (model_config), the manifest, checkpoint conversion
(convert), LoRA file formats and key mapping, the safe destination. Imports verify.models (the class a config.json
names), verify.maths and verify.errors only."""
