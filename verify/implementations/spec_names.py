"""Built-in SPECs: the product's processors, diffusers itself and DiffSynth-Studio's DiT, each a registered callable
(torch-free, so that the command line can list them without importing a model)."""

BUILTINS = {
    "reference": "verify.implementations.builtins:reference",
    "fast": "verify.implementations.builtins:fast",
    "fast-compiled": "verify.implementations.builtins:fast_compiled",
    "diffusers": "verify.implementations.builtins:diffusers",
    "diffusers-flex": "verify.implementations.builtins:diffusers_flex",
    "diffsynth": "verify.implementations.diffsynth:diffsynth",
}
