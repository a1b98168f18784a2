"""`fast-compiled` with its region traced by dynamo but not compiled (backend "eager"), for `qkv-verify test` in CI.

Dynamo captures the region's graph as it does for inductor, with the same marks, budget and guards (where all three of
the defects the suite found lived: reports/gpu/NOTES.md, "Changes: predicted and measured", 16-18), and runs it op by
op, each op rounding as inductor keeps it under emulate_precision_casts. Not exercised: AOTAutograd (the repository's
region tests run it, aot_eager: properties/implementations/test_fast_fused.py) and inductor's code generation, which on
2 CPU cores took 856 s for the 8 graphs of one of the suite's 8 properties
(reports/suite/fast-compiled-inductor-cpu-fp32-attention.log); with aot_eager the whole suite took 787 s on those cores
(reports/suite/fast-compiled-aot-eager-cpu.log). Inductor's own kernels are judged on the GPU.
"""

from verify.implementations.fast_fused import RegionCompiledFusedQwenAttnProcessor
from verify.implementations.fused import fuse_attention, joint_attentions


def build(standard, component):
    attentions = [standard] if component == "attention" else joint_attentions(standard)
    for attn in attentions:
        fuse_attention(attn, processor=RegionCompiledFusedQwenAttnProcessor(backend="eager"))
    return standard


build.layout = "blocked"
