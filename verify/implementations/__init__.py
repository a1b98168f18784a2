"""What is judged: diffusers' standard model, the fused processors, candidates and their adapters, loading models.
Imports verify.models, verify.maths and verify.files."""
