"""`qkv-verify bench`: the speed of the merged-QKV block against diffusers' standard one, measured, never assumed
(verify.bench.run), one module per job. Imports verify.checks and below."""
