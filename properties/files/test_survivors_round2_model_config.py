"""A checkpoint's recorded merge, for the survivor of the second mutation run
(reports/mutation/verdicts-messages-writes.txt) in verify/files/model_config.py: a qkv_merge whose layout is unknown
is refused for what it is, whatever its naming."""

from __future__ import annotations

import json

from properties.checkpoint_files import standard_checkpoint
from properties.files.test_lora_files import STANDARD, random_modules, write_lora
from verify.cli import main


def test_a_recorded_merge_with_an_unknown_layout_is_refused_as_malformed(tmp_path, capsys):
    """Kills x_merge_recorded__mutmut_6 (`layout known and naming known` read as `layout known or naming known`):
    qkv_merge {naming: seed, layout: diagonal} in config.json is a malformed record (exit 2, saying what it must be),
    not a layout the user is told to pass."""
    folder = standard_checkpoint(tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    merge = {"naming": "seed", "layout": "diagonal"}
    (folder / "config.json").write_text(json.dumps({**config, "qkv_merge": merge}))
    lora = write_lora(tmp_path / "l.safetensors", "diffusers",
                      random_modules(STANDARD, ["transformer_blocks.0.attn.to_q"], 2, 0))
    capsys.readouterr()
    assert main(["lora-audit", str(lora), "--checkpoint", str(folder)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"qkv-verify: error: {folder}/config.json: qkv_merge must be {{naming: seed|diffusers, layout: "
        f"blocked|interleaved}}, got {merge!r}"]
