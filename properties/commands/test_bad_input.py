"""Bad input to every command: exit status 2, one line on stderr that says what and where, no traceback, nothing
written, and the input files untouched (bytes and mtimes).

Each fault is planted in a fresh copy of valid inputs (a sharded standard checkpoint, its merged conversion, a LoRA
file, a summary.json); the same commands on the unplanted copy must succeed, so a fault that is "caught" only
because the command fails anyway would show.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from properties.checkpoint_files import standard_checkpoint
from verify.cli import main
from verify.files.convert import INDEX, convert

FAST = ["--dtypes", "fp64,fp32"]
DIM = 64  # the tiny model's inner dim


@dataclass(frozen=True)
class Inputs:
    """A workspace of valid inputs; outputs go to `out` (which must not exist afterwards when a command fails)."""

    root: Path

    @property
    def std(self) -> Path:
        return self.root / "in" / "std"

    @property
    def merged(self) -> Path:
        return self.root / "in" / "merged"

    @property
    def lora(self) -> Path:
        return self.root / "in" / "lora.safetensors"

    @property
    def summary(self) -> Path:
        return self.root / "in" / "summary.json"

    @property
    def out(self) -> Path:
        return self.root / "out"

    def shard(self, folder: Path, key: str) -> Path:
        return folder / json.loads((folder / INDEX).read_text())["weight_map"][key]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    (root / "in").mkdir()
    std = standard_checkpoint(root / "in" / "std", shard_size="40KB")
    convert(std, root / "in" / "merged", "merged")
    (root / "in" / "merged" / "qkv-verify-manifest.json").unlink()
    g = torch.Generator().manual_seed(0)
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, DIM, generator=g),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(DIM, 2, generator=g)},
              str(root / "in" / "lora.safetensors"))
    assert main(["report", "--out", str(root / "report"), *FAST]) == 0
    shutil.copyfile(root / "report" / "summary.json", root / "in" / "summary.json")
    shutil.rmtree(root / "report")
    return root


@pytest.fixture
def inputs(pristine, tmp_path) -> Inputs:
    shutil.copytree(pristine / "in", tmp_path / "in")
    return Inputs(tmp_path)


# --- faults: each edits the workspace and returns the text the error line must contain ----------------------------

Q = "transformer_blocks.0.attn.to_q.weight"
K = "transformer_blocks.0.attn.to_k.weight"
QKV = "transformer_blocks.0.attn.to_qkv.weight"


def _rewrite(path: Path, edit: Callable[[dict], dict]) -> None:
    save_file(edit(load_file(path)), str(path), metadata={"format": "pt"})


def _reindex(folder: Path, edit: Callable[[dict], None]) -> None:
    index = json.loads((folder / INDEX).read_text())
    edit(index["weight_map"])
    (folder / INDEX).write_text(json.dumps(index))


def missing(w: Inputs, target: Path) -> str:
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    return str(target)


def empty(w: Inputs, target: Path) -> str:
    f = w.shard(target, Q if target == w.std else QKV) if target.is_dir() else target
    f.write_bytes(b"")
    return str(f)


def truncated(w: Inputs, target: Path) -> str:
    f = w.shard(target, Q if target == w.std else QKV) if target.is_dir() else target
    f.write_bytes(f.read_bytes()[:-5])
    return str(f)


def absurd_header(w: Inputs, target: Path) -> str:
    f = w.shard(target, Q if target == w.std else QKV) if target.is_dir() else target
    f.write_bytes(struct.pack("<Q", 10**15) + f.read_bytes()[8:])
    return str(f)


def corrupt_header(w: Inputs, target: Path) -> str:
    f = w.shard(target, Q if target == w.std else QKV) if target.is_dir() else target
    data = bytearray(f.read_bytes())
    data[8] = ord("[")  # the header's opening brace
    f.write_bytes(bytes(data))
    return str(f)


def lying_header(w: Inputs, target: Path) -> str:
    """Valid JSON whose offsets point past the data."""
    f = w.shard(target, Q if target == w.std else QKV) if target.is_dir() else target
    (n,) = struct.unpack("<Q", f.read_bytes()[:8])
    header = json.loads(f.read_bytes()[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 4096
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text)) + text + f.read_bytes()[8 + n:])
    return str(f)


def missing_shard(w: Inputs, target: Path) -> str:
    f = w.shard(target, Q if target == w.std else QKV)
    f.unlink()
    return f.name


def fused_rows(w: Inputs, target: Path) -> str:
    _rewrite(w.shard(w.merged, QKV), lambda sd: sd | {QKV: sd[QKV][:-1].clone()})
    return QKV


def q_without_k(w: Inputs, target: Path) -> str:
    _rewrite(w.shard(w.std, K), lambda sd: {k: v for k, v in sd.items() if k != K})
    _reindex(w.std, lambda m: m.pop(K))
    return "transformer_blocks.0.attn."


def duplicate_keys(w: Inputs, target: Path) -> str:
    other = next(p for p in sorted(w.std.glob("*.safetensors")) if p != w.shard(w.std, Q))
    _rewrite(other, lambda sd: sd | {Q: load_file(w.shard(w.std, Q))[Q]})
    return Q


def unknown_fused_naming(w: Inputs, target: Path) -> str:
    key = "transformer_blocks.0.attn.add_qkv_proj.weight"
    for k in (key, key.replace("weight", "bias")):
        new = k.replace("add_qkv_proj", "qkv_text")
        _rewrite(w.shard(w.merged, k), lambda sd, k=k, new=new: {(new if x == k else x): v for x, v in sd.items()})
        _reindex(w.merged, lambda m, k=k, new=new: m.__setitem__(new, m.pop(k)))
    return "qkv_text"


CHECKPOINT_FAULTS = [missing, empty, truncated, absurd_header, corrupt_header, lying_header, missing_shard]


# --- commands: argv that reads the workspace, given which input is faulty ----------------------------------------

def report_std(w: Inputs) -> list[str]:
    return ["report", "--checkpoint", str(w.std), "--out", str(w.out), *FAST]


def report_merged(w: Inputs) -> list[str]:
    return ["report", "--checkpoint", str(w.std), "--merged-checkpoint", str(w.merged), "--out", str(w.out), *FAST]


def convert_std(w: Inputs) -> list[str]:
    return ["convert", str(w.std), str(w.out), "--to", "merged"]


def convert_merged(w: Inputs) -> list[str]:
    return ["convert", str(w.merged), str(w.out), "--to", "standard"]


def check_merged(w: Inputs) -> list[str]:
    return ["convert", "--check", str(w.std), str(w.merged)]


def lora_audit_std(w: Inputs) -> list[str]:
    return ["lora-audit", str(w.lora), "--checkpoint", str(w.std), "--json", str(w.out)]


def lora_convert_merged(w: Inputs) -> list[str]:
    return ["lora-convert", str(w.lora), str(w.out), "--to", "merged", "--checkpoint", str(w.merged)]


def lora_audit_file(w: Inputs) -> list[str]:
    return ["lora-audit", str(w.lora), "--config", "tiny", "--json", str(w.out)]


def regress_file(w: Inputs) -> list[str]:
    return ["regress", str(w.summary), str(w.summary), "--json", str(w.out)]


# (command, which input the fault hits, fault)
CASES = (
    [(c, "std", f) for c in (report_std, convert_std, lora_audit_std) for f in CHECKPOINT_FAULTS]
    + [(c, "merged", f) for c in (report_merged, convert_merged, check_merged, lora_convert_merged)
       for f in CHECKPOINT_FAULTS]
    + [(c, "lora", f) for c in (lora_audit_file,) for f in (missing, empty, truncated, absurd_header, corrupt_header,
                                                              lying_header)]
    + [(c, "std", f) for c in (report_std, convert_std) for f in (q_without_k, duplicate_keys)]
    + [(lora_audit_std, "std", duplicate_keys)]
    + [(c, "merged", f) for c in (report_merged, convert_merged) for f in (fused_rows, unknown_fused_naming)]
    + [(regress_file, "summary", f) for f in (missing, empty, corrupt_header)]
)



def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


def _target(w: Inputs, which: str) -> Path:
    return {"std": w.std, "merged": w.merged, "lora": w.lora, "summary": w.summary}[which]


def test_every_command_succeeds_on_the_unplanted_inputs(inputs, capsys):
    commands = {c for c, _, _ in CASES}
    for command in sorted(commands, key=lambda c: c.__name__):
        code, err = _run(command(inputs), capsys)
        assert code == 0, (command.__name__, err)
        shutil.rmtree(inputs.out) if inputs.out.is_dir() else inputs.out.unlink(missing_ok=True)


@pytest.mark.parametrize("command, which, fault", [
    pytest.param(c, w, f, id=f"{c.__name__}-{f.__name__}") for c, w, f in CASES
])
def test_bad_input_exits_2_with_one_line_and_leaves_everything_as_it_was(inputs, capsys, command, which, fault):
    where = fault(inputs, _target(inputs, which))
    before = _snapshot(inputs.root)
    code, err = _run(command(inputs), capsys)
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith("qkv-verify: error:"), err
    assert where in err[0], f"the line should name {where!r}: {err[0]}"
    assert _snapshot(inputs.root) == before, "the input changed, or something was written"


@pytest.mark.parametrize("argv", [
    ["convert", "{std}", "{std}", "--to", "merged"],
    ["convert", "{std}", "{std}/inside", "--to", "merged"],
    ["convert", "--check", "{std}", "{std}"],
    ["convert", "{std}", "{out}", "--to", "merged", "--naming", "nunchaku"],
    ["lora-convert", "{lora}", "{lora}", "--to", "merged", "--config", "tiny"],
    ["report", "--checkpoint", "{std}", "--out", "{std}", "--dtypes", "fp64,fp32"],
], ids=["convert-dst-is-src", "convert-dst-in-src", "check-dst-is-src", "convert-unknown-naming",
        "lora-convert-dst-is-src", "report-out-is-checkpoint"])
def test_destination_equal_to_source_or_unknown_naming_exits_2(inputs, capsys, argv):
    argv = [a.format(std=inputs.std, lora=inputs.lora, out=inputs.out) for a in argv]
    before = _snapshot(inputs.root)
    code, err = _run(argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("qkv-verify: error:"), (code, err)
    assert _snapshot(inputs.root) == before


def test_unknown_naming_for_lora_convert_exits_2(inputs, capsys):
    code, err = _run(["lora-convert", str(inputs.lora), str(inputs.out), "--to", "merged", "--naming", "nunchaku",
                      "--config", "tiny"], capsys)
    assert code == 2 and "naming" in err[-1] and not inputs.out.exists()


def test_non_finite_weights_are_named_by_report(inputs, capsys):
    _rewrite(inputs.shard(inputs.std, Q), lambda sd: sd | {Q: sd[Q].index_fill(0, torch.tensor([0]), float("nan"))})
    code = main(report_std(inputs))
    summary = json.loads((inputs.out / "summary.json").read_text())
    failed = [c for c in summary["checks"] if not c["passed"]]
    assert code == 1 and any(Q in c["message"] for c in failed), [c["message"] for c in failed]


@pytest.mark.parametrize("fault", [fused_rows, unknown_fused_naming])
def test_check_of_a_dst_with_a_wrong_tensor_names_it_and_exits_1(inputs, capsys, fault):
    """To --check a well-formed DST whose tensors are wrong is not bad input: the proof fails (1), naming the tensor."""
    where = fault(inputs, inputs.merged)
    before = _snapshot(inputs.root)
    capsys.readouterr()
    assert main(check_merged(inputs)) == 1
    assert where in capsys.readouterr().out and _snapshot(inputs.root) == before


def test_non_finite_weights_warn_in_convert_and_stay_exact(inputs, capsys):
    _rewrite(inputs.shard(inputs.std, Q), lambda sd: sd | {Q: sd[Q].index_fill(0, torch.tensor([1]), float("inf"))})
    code, err = _run(convert_std(inputs), capsys)
    assert code == 0 and len(err) == 1 and Q in err[0] and "warning" in err[0]
    assert main(["convert", "--check", str(inputs.std), str(inputs.out)]) == 0


def test_no_traceback_through_the_console(inputs):
    empty(inputs, inputs.std)
    result = subprocess.run([sys.executable, "-m", "verify.cli", *convert_std(inputs)], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("qkv-verify: error:")

