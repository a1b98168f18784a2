"""The LoRA commands' --help and a misspelt --naming, for the survivors of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/commands/lora.py: the options' metavars and help lines the
three commands share, lora-audit's description, and lora-convert's --naming choices."""

from __future__ import annotations

import pytest

from properties.commands import help_paragraphs
from properties.files.test_lora_files import STANDARD, random_modules, write_lora
from verify.cli import main

ATTN = "transformer_blocks.0.attn."


@pytest.mark.parametrize("command", ["lora-audit", "lora-convert", "lora-compare"])
def test_the_model_options_show_their_metavars_and_help(command, capsys, monkeypatch):
    """Kills x__model_args__mutmut_3 (--model's help starts "None:"), _12 (--checkpoint shown as CHECKPOINT, not DIR)
    and _23 (--checkpoint's help shouted)."""
    usage, *_, options = help_paragraphs(command, capsys, monkeypatch)
    assert "[--checkpoint DIR | --config {tiny,small,full}]" in usage
    assert ("--model {qwen-image,qwen-image-2.1} the model the LoRA is for: qwen-image or qwen-image-2.1 (default: "
            "the model a given checkpoint's config.json names, else qwen-image)") in options
    assert "--checkpoint DIR diffusers checkpoint folder, standard or merged; only config.json and the tensor " \
           "headers are read (default: " in options


@pytest.mark.parametrize("command", ["lora-audit", "lora-convert"])
def test_adapter_config_is_shown_as_file(command, capsys, monkeypatch):
    """Kills x__model_args__mutmut_57 (`--adapter-config file`, lower case unlike every other metavar)."""
    usage, *_, options = help_paragraphs(command, capsys, monkeypatch)
    assert "[--adapter-config FILE]" in usage
    assert "--adapter-config FILE PEFT adapter_config.json (default: the file's metadata, else adapter_config.json " \
           "beside it)" in options


def test_lora_audits_description_says_what_it_reports_and_its_exit_status(capsys, monkeypatch):
    """Kills x_register__mutmut_16 (the description's middle garbled)."""
    assert help_paragraphs("lora-audit", capsys, monkeypatch)[1] == (
        "What a LoRA file does to a model: modules matched and unmatched, weights changed, ranks, the scale and where "
        "it comes from, q/k/v capacity, and warnings. Exit status: 0 the audit ran (warnings do not fail it unless "
        "--strict), 1 --strict and a warning, 2 bad input.")


def test_lora_convert_offers_the_two_namings_and_refuses_any_other(tmp_path, capsys, monkeypatch):
    """Kills x_register__mutmut_146 (--naming without choices): --help lists seed and diffusers, and a misspelt naming
    is a usage error naming the option, with nothing written."""
    usage = help_paragraphs("lora-convert", capsys, monkeypatch)[0]
    assert "[--naming {seed,diffusers}]" in usage
    src = write_lora(tmp_path / "l.safetensors", "diffusers",
                     random_modules(STANDARD, [ATTN + x for x in ("to_q", "to_k", "to_v")], 2, 0))
    dst = tmp_path / "merged.safetensors"
    with pytest.raises(SystemExit) as done:
        main(["lora-convert", str(src), str(dst), "--to", "merged", "--naming", "Seed", "--config", "tiny"])
    assert done.value.code == 2
    assert "argument --naming: invalid choice: 'Seed'" in capsys.readouterr().err
    assert not dst.exists()
