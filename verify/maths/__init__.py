"""The maths, apart from files and models: q/k/v merge and split, state-dict renaming, the namings, LoRA algebra.
Imports nothing of verify but verify.errors."""
