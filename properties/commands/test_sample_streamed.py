"""`qkv-verify sample --stream` (and `--config full`, which always streams): every run, the fp64 oracle included,
holds one block's weights at a time, built again by its implementation before each model call. It must sample
exactly what the whole model samples (2.1's prefix KV cache across steps included), catch and locate every planted
sampling bug in the same submodule, read checkpoints the same way, and never hold two blocks at once."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from properties.checkpoint_files import merged_checkpoint
from properties.commands.sampling_run import assert_refused, run_sample
from verify.checks.streaming import StateDictSource, streamed_model
from verify.implementations.candidate import resolve
from verify.models import qwen_image, qwen_image_21
from verify.planted import PLANTED_SAMPLING, PLANTED_SAMPLING_21

FAST = ["--steps", "3", "--dtypes", "fp64,fp32"]
RUN = ("trajectory", "final", "single_pass", "images")  # every number a run measured
REACHED_BY = {"zero_cond_modulation_memoised": ["--fixture", "edit-2511"],
              "cache_appended_21": ["--model", "qwen-image-2.1"]}  # the others: Qwen-Image's text-to-image


def sample(tmp_path, name: str, *args: str) -> tuple[int, dict]:
    return run_sample(tmp_path / name, *FAST, *args)


@pytest.mark.parametrize("args", [[], ["--model", "qwen-image-2.1", "--fixture", "edit"]])
def test_a_streamed_run_samples_the_whole_models_run_bit_for_bit(tmp_path, args):
    """Qwen-Image with true CFG, and 2.1 whose prefix KV cache, filled at step 1, every later step decodes over."""
    (code, whole), (streamed_code, streamed) = (sample(tmp_path, n, *args, *s) for n, s in (("w", []),
                                                                                          ("s", ["--stream"])))
    assert code == streamed_code == 0
    assert {k: streamed[k] for k in RUN} == {k: whole[k] for k in RUN}
    assert all(r["fused_calls"] > 0 for r in streamed["trajectory"])  # the candidate's fused blocks ran, streamed
    assert whole["sampling"]["streamed"] is None and streamed["sampling"]["streamed"].startswith("every run")
    assert streamed["sampling"]["oracle_device"] == "cpu"
    assert "; streamed block by block, the oracle on cpu" in streamed["compared"]
    assert "streamed" not in whole["compared"]


@pytest.mark.parametrize("name", [*PLANTED_SAMPLING, *PLANTED_SAMPLING_21])
def test_every_planted_sampling_bug_is_caught_streamed_where_the_whole_model_locates_it(tmp_path, name):
    runs = [sample(tmp_path, n, "--candidate", f"verify.planted:{name}", *REACHED_BY.get(name, []), *s)
            for n, s in (("w", []), ("s", ["--stream"]))]
    assert [code for code, _ in runs] == [1, 1]
    whole, streamed = ({r["dtype"]: (r["name"], r["first_divergence"]) for r in summary["trajectory"]
                        if r["first_divergence"]} for _, summary in runs)
    assert {"fp64", "fp32"} <= set(streamed) and streamed == whole
    assert all(where.split(": ", 1)[1].startswith("transformer_blocks.") for _, where in streamed.values())


def test_a_checkpoint_and_a_merged_checkpoint_stream_as_they_load_whole(tmp_path):
    root = tmp_path / "folders"
    qwen_image.build_model(qwen_image.model_config("tiny"), 0).save_pretrained(root / "std", max_shard_size="400KB")
    merged_checkpoint(root / "std", root / "merged", layout="interleaved")
    folders = ["--checkpoint", str(root / "std"), "--merged-checkpoint", str(root / "merged"), "--layout",
               "interleaved"]
    (code, whole), (streamed_code, streamed) = (sample(tmp_path, n, *folders, *s) for n, s in (("w", []),
                                                                                             ("s", ["--stream"])))
    assert code == streamed_code == 0
    assert {k: streamed[k] for k in (*RUN, "weights")} == {k: whole[k] for k in (*RUN, "weights")}
    assert all(r["fused_calls"] > 0 for r in streamed["trajectory"])


def test_a_streamed_model_holds_one_blocks_weights_at_a_time():
    """While a block runs it alone holds tensors; between calls none does; and each call gets a fresh build (an
    implementation that changed its weights in place would not carry that to the next call)."""
    config = qwen_image_21.model_config("tiny", num_layers=3)
    source = StateDictSource(qwen_image_21.build_model(config, 0).state_dict(), config)
    model = streamed_model(qwen_image_21, source, resolve("reference", None, None), torch.float32, "cpu", "candidate")
    blocks = list(model.transformer_blocks)
    holding = []

    def held(module: nn.Module, _args) -> None:
        holding.append([b is module for b in blocks if any(p.numel() for p in b.parameters())])
        next(module.parameters()).data.add_(1.0)  # gone by the next call: every call builds the block again

    for block in blocks:
        block.register_forward_pre_hook(held)
    inputs = qwen_image_21.model_inputs(config, qwen_image_21.FIXTURES["text-to-image"], 0)
    first, second = (model(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                              for k, v in inputs.items()}, return_dict=False)[0] for _ in range(2))
    assert holding == [[True]] * 6 and torch.equal(first, second)
    assert all(p.numel() == 0 for p in model.transformer_blocks.parameters())
    assert all(p.numel() > 0 for p in model.img_in.parameters())  # the non-block modules stay whole


def candidate_without_blocks(standard: nn.Module, component: str) -> nn.Module | None:
    """A candidate that provides its whole model only: it cannot be streamed."""
    return standard if component == "model" else None


@pytest.mark.parametrize("args, words", [
    (["--stream", "--candidate", f"{__name__}:candidate_without_blocks"],
     f"candidate {__name__}:candidate_without_blocks provides no 'block': a streamed model builds one block at a "
     "time"),
    (["--stream", "--lora", "any.safetensors"], "--lora cannot be sampled streamed (--stream, --config full)"),
    (["--config", "full", "--lora", "any.safetensors"], "--lora cannot be sampled streamed"),  # full always streams
])
def test_what_cannot_be_streamed_is_refused_in_one_line(tmp_path, capsys, args, words):
    code, _ = sample(tmp_path, "out", *args)
    assert_refused(code, tmp_path / "out", capsys.readouterr().err, words)


def test_a_streamed_locate_watches_one_blocks_submodules_at_a_time(tmp_path, monkeypatch):
    """A failing step is located in two passes, the blocks whole then the submodules of the first that left the
    bound, so no more than one block's submodule outputs are ever held (at the real width, all of them in fp64 would
    not fit a card); the whole model's locate watches every block's at once."""
    from verify.checks import divergence

    watched, real = {}, divergence.submodule_outputs

    def spy(module: nn.Module):
        inside = {n.split(".")[1] for n, _ in module.named_modules() if n.startswith("transformer_blocks.")
                  and n.count(".") >= 2}  # blocks whose submodules are hooked
        watched[mode].append(inside)
        return real(module)

    monkeypatch.setattr(divergence, "submodule_outputs", spy)
    for mode, extra in (("whole", []), ("streamed", ["--stream"])):
        watched[mode] = []
        code, _ = sample(tmp_path, mode, "--candidate", "verify.planted:scale_error_1e3", *extra)
        assert code == 1
    assert max(len(blocks) for blocks in watched["whole"]) == 2  # the tiny model's two blocks
    assert max(len(blocks) for blocks in watched["streamed"]) == 1
