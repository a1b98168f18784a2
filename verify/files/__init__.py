"""File formats: checkpoint reading, the manifest, LoRA file formats and key mapping, the safe destination.
Imports verify.maths (and verify.errors) only."""
