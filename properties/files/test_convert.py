"""`qkv-verify convert` end to end: exact round trips on sharded diffusers checkpoints, the files diffusers expects,
streaming, safe writing, the manifest, and `--check` catching planted differences."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from properties.checkpoint_files import standard_checkpoint
from verify.cli import main
from verify.files import convert as conv
from verify.files import destination, scan
from verify.files import manifest as mf
from verify.files.checkpoint import DTYPES, Checkpoint
from verify.files.model_config import model_config
from verify.implementations.loading import build_merged
from verify.maths import qkv

HEAD_DIM = 16  # the tiny config's
QKV_LEAVES = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and mtime: the input must come out of every command untouched."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def convert(*argv: str) -> int:
    return main(["convert", *map(str, argv)])


@pytest.fixture(scope="module")
def std(tmp_path_factory) -> Path:
    """A tiny standard checkpoint saved by diffusers in small shards, q/k/v of some block split across shards."""
    path = standard_checkpoint(tmp_path_factory.mktemp("std") / "std", shard_size="40KB")
    index = json.loads((path / conv.INDEX).read_text())["weight_map"]
    groups = [[f"transformer_blocks.{b}.attn.{x}.weight" for x in xs] for b in range(2)
              for xs in (QKV_LEAVES[:3], QKV_LEAVES[3:])]
    split = [g for g in groups if len({index[k] for k in g}) > 1]
    assert split, "the fixture must have a q/k/v group spread over several shards"
    return path


@pytest.mark.parametrize("naming", ["seed", "diffusers"])
@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_round_trip_is_byte_exact_and_loads(tmp_path, std, naming, layout):
    before = snapshot(std)
    merged, back = tmp_path / "merged", tmp_path / "back"
    assert convert(std, merged, "--to", "merged", "--naming", naming, "--layout", layout) == 0
    assert convert(merged, back, "--to", "standard", "--layout", layout) == 0
    a, m, b = tensors(std), tensors(merged), tensors(back)
    assert set(a) == set(b) and all(as_bytes(a[k]) == as_bytes(b[k]) and a[k].dtype == b[k].dtype for k in a)
    passthrough = [k for k in a if k.rsplit(".", 2)[-2] not in QKV_LEAVES]
    assert passthrough and all(as_bytes(a[k]) == as_bytes(m[k]) for k in passthrough)
    fused = [k for k in m if k not in a]
    assert len(fused) == 2 * 2 * 2, fused  # 2 blocks x 2 streams x (weight, bias)
    # the merged checkpoint is what the merged model loads, and its split equals the standard weights
    ckpt = Checkpoint(merged)
    model = build_merged(ckpt, model_config(ckpt), layout)
    assert {k: as_bytes(v) for k, v in model.state_dict().items()} == {k: as_bytes(m[k].double()) for k in m}
    # diffusers itself loads the standard result
    loaded = QwenImageTransformer2DModel.from_pretrained(back)
    assert all(torch.equal(v, a[k].to(v.dtype)) for k, v in loaded.state_dict().items())
    assert snapshot(std) == before


def test_fused_tensor_is_the_layout_stated(tmp_path, std):
    """Independent of verify.maths.state_dict: blocked is cat([q, k, v]); interleaved puts each head's q, k, v
    together."""
    a = tensors(std)
    for layout in ("blocked", "interleaved"):
        assert convert(std, tmp_path / layout, "--to", "merged", "--layout", layout) == 0
    key = "transformer_blocks.1.attn.add_qkv_proj.weight"
    q, k, v = (a[f"transformer_blocks.1.attn.add_{x}_proj.weight"] for x in "qkv")
    assert torch.equal(tensors(tmp_path / "blocked")[key], torch.cat([q, k, v]))
    inter = tensors(tmp_path / "interleaved")[key].reshape(4, 3, HEAD_DIM, -1)  # (heads, q|k|v, head_dim, in)
    assert torch.equal(inter[:, 0].reshape(q.shape), q), "each head's group starts with its q rows"
    assert torch.equal(inter[:, 1].reshape(q.shape), k) and torch.equal(inter[:, 2].reshape(q.shape), v)


def test_output_files_are_named_and_indexed_as_diffusers_does(tmp_path, std):
    assert convert(std, tmp_path / "m", "--to", "merged") == 0
    out = tmp_path / "m"
    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and [s.name for s in shards] == [f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
                                                   for i in range(1, n + 1)]
    index = json.loads((out / conv.INDEX).read_text())
    held = {}
    for s in shards:
        with safe_open(str(s), framework="pt") as f:
            held.update({k: s.name for k in f.keys()})
            assert f.metadata() == {"format": "pt"}
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(out).values())
    written = json.loads((out / "config.json").read_text())
    assert written.pop("qkv_merge") == {"naming": "seed", "layout": "blocked"}, "the merge it holds is recorded"
    assert written == json.loads((std / "config.json").read_text()), "every other field as SRC has it"
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".safetensors")) == sorted(
        ["config.json", conv.INDEX, mf.NAME])


def test_single_file_source_gives_a_single_file(tmp_path, std):
    one = tmp_path / "one.safetensors"
    save_file(tensors(std), str(one))
    assert convert(one, tmp_path / "m", "--to", "merged", "--layout", "interleaved") == 0
    assert [p.name for p in sorted((tmp_path / "m").iterdir())] == [conv.WEIGHTS, mf.NAME]
    assert convert(tmp_path / "m", tmp_path / "s", "--to", "standard", "--layout", "interleaved") == 0
    a, b = tensors(std), load_file(tmp_path / "s" / conv.WEIGHTS)
    assert set(a) == set(b) and all(as_bytes(a[k]) == as_bytes(b[k]) for k in a)
    assert convert("--check", one, tmp_path / "m") == 0


def test_streams_only_q_k_v_groups_through_tensors(tmp_path, std, monkeypatch):
    """Every other tensor is copied in chunks; only q/k/v (or fused) tensors are read whole, one group at a time."""
    loaded, live, peak = [], {}, [0]
    real = conv.load

    def spy(t):
        loaded.append(t.key)
        tensor = real(t)
        live[t.key] = tensor.numel() * tensor.element_size()
        peak[0] = max(peak[0], sum(live.values()))
        return tensor

    real_convert = conv.Plan.convert

    def convert_and_forget(self, group, sources):
        out = real_convert(self, group, sources)
        live.clear()
        return out

    monkeypatch.setattr(conv, "load", spy)
    monkeypatch.setattr(conv.Plan, "convert", convert_and_forget)
    monkeypatch.setattr(conv, "CHUNK", 4096)
    assert convert(std, tmp_path / "m", "--to", "merged") == 0
    assert loaded and all(k.rsplit(".", 2)[-2] in QKV_LEAVES for k in loaded)
    a = tensors(std)
    group = 3 * a["transformer_blocks.0.attn.to_q.weight"].nbytes
    assert 0 < peak[0] <= group


def test_check_proves_and_catches_planted_differences(tmp_path, std, capsys):
    merged = tmp_path / "m"
    assert convert(std, merged, "--to", "merged", "--layout", "interleaved") == 0
    assert convert("--check", std, merged) == 0
    assert "proven" in capsys.readouterr().out

    def planted(name: str, edit) -> tuple[int, str]:
        bad = tmp_path / name
        assert convert(std, bad, "--to", "merged", "--layout", "interleaved") == 0
        edit(bad)
        capsys.readouterr()
        code = convert("--check", std, bad)
        return code, capsys.readouterr().out

    def rewrite(folder: Path, key: str, change) -> None:
        shard = folder / json.loads((folder / conv.INDEX).read_text())["weight_map"][key]
        sd = load_file(shard)
        sd[key] = change(sd[key])
        save_file(sd, str(shard), metadata={"format": "pt"})

    fused = "transformer_blocks.1.attn.to_qkv.weight"
    other = "transformer_blocks.0.img_mlp.net.2.weight"

    def swap_kv(t):
        shape = qkv.QKVShape.equal(t.shape[0], HEAD_DIM)
        q, k, v = qkv.split(t, shape, "interleaved")
        return qkv.merge(q, v, k, "interleaved", HEAD_DIM)

    def one_ulp(t):
        t = t.clone()
        t.view(-1).view(torch.int32)[7] += 1
        return t

    cases = {
        "kv-swapped": (lambda f: rewrite(f, fused, swap_kv), fused),
        "one-ulp": (lambda f: rewrite(f, other, one_ulp), other),
        "blocked": (lambda f: rewrite(f, fused, lambda t: qkv.convert_layout(
            t, qkv.QKVShape.equal(t.shape[0], HEAD_DIM), "interleaved", "blocked")), fused),
    }
    for name, (edit, key) in cases.items():
        code, out = planted(name, edit)
        assert code == 1 and f"tensor {key} differs" in out, (name, out)
    code, out = planted("dropped", lambda f: rewrite(f, other, lambda t: t[:-1]))
    assert code == 1 and other in out
    code, out = planted("manifest", lambda f: _edit_manifest(f, other))
    assert code == 1 and f"entry for {other}" in out
    # without its manifest, the layout comes from --layout (default blocked): the interleaved DST is then not proven
    (merged / mf.NAME).unlink()
    assert convert("--check", std, merged) == 1
    assert convert("--check", std, merged, "--layout", "interleaved") == 0


def _flip_first_chunk_byte(folder: Path, key: str) -> None:
    """Flip one byte near the start of `key`'s bytes in DST: a difference in the first chunk only."""
    t = conv.tensors_of(conv.open_checkpoint(folder))[key]
    with t.path.open("r+b") as f:
        f.seek(t.offset + 10)
        byte = f.read(1)[0]
        f.seek(t.offset + 10)
        f.write(bytes([byte ^ 0xFF]))


def _check_copied_tensor_over_chunks(src: Path, dst: Path, key: str, capsys) -> None:
    """DST without a manifest is proven; with one byte of `key`'s first chunk flipped, it is not, naming `key`."""
    (dst / mf.NAME).unlink()  # no manifest: the chunk comparison alone must see the difference
    capsys.readouterr()
    assert convert("--check", src, dst) == 0 and "DST has no manifest" in capsys.readouterr().out
    _flip_first_chunk_byte(dst, key)
    assert convert("--check", src, dst) == 1
    assert f"not proven: tensor {key} differs" in capsys.readouterr().out


def test_check_sees_a_difference_in_the_first_chunk_of_a_copied_tensor(tmp_path, std, capsys, monkeypatch):
    """A copied tensor is compared a chunk at a time: with 4 KiB chunks, a 64 KiB weight is 16 of them."""
    key = "transformer_blocks.0.img_mlp.net.2.weight"
    monkeypatch.setattr(conv, "CHUNK", 4096)
    assert conv.tensors_of(conv.open_checkpoint(std))[key].nbytes > 4 * conv.CHUNK
    assert convert(std, tmp_path / "m", "--to", "merged") == 0
    _check_copied_tensor_over_chunks(std, tmp_path / "m", key, capsys)


def test_check_sees_a_difference_in_the_first_chunk_of_a_real_size_weight(tmp_path, std, capsys):
    """A 3072 x 3072 bf16 weight, as the full model holds them, is 18 MiB: two 16 MiB chunks."""
    key = "transformer_blocks.0.img_mlp.net.2.weight"
    big = torch.randn(3072, 3072, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert scan.CHUNK < big.numel() * big.element_size() < 2 * scan.CHUNK
    src = tmp_path / "src.safetensors"  # one file, no config.json: nothing holds the weight to the tiny model's shape
    save_file(tensors(std) | {key: big}, str(src))
    assert convert(src, tmp_path / "m", "--to", "merged") == 0
    _check_copied_tensor_over_chunks(src, tmp_path / "m", key, capsys)


def _edit_manifest(folder: Path, key: str) -> None:
    m = json.loads((folder / mf.NAME).read_text())
    m["tensors"][key]["sha256"] = "0" * 64
    (folder / mf.NAME).write_text(json.dumps(m))


def test_manifest_records_tensors_source_and_parameters(tmp_path, std):
    assert convert(std, tmp_path / "m", "--to", "merged", "--naming", "diffusers") == 0
    m = mf.read(tmp_path / "m")
    out = tensors(tmp_path / "m")
    import hashlib
    assert m["tensors"] == {k: {"shape": list(t.shape), "dtype": "F32", "sha256": hashlib.sha256(as_bytes(t))
                                .hexdigest()} for k, t in out.items()}
    assert m["conversion"] == {"to": "merged", "naming": "diffusers", "layout": "blocked", "head_dim": HEAD_DIM}
    src = {k: mf.Entry(tuple(t.shape), "F32", hashlib.sha256(as_bytes(t)).hexdigest())
           for k, t in tensors(std).items()}
    assert m["source"]["identity"] == mf.identity(src) and m["identity"] == mf.identity(mf.entries_of(m))
    # the merged output converted back names the merged output as its source
    assert convert(tmp_path / "m", tmp_path / "s", "--to", "standard") == 0
    assert mf.read(tmp_path / "s")["source"]["identity"] == m["identity"]
    assert mf.read(tmp_path / "s")["identity"] == m["source"]["identity"]


def test_check_of_another_source_is_not_proven(tmp_path, std):
    other = standard_checkpoint(tmp_path / "other", seed=1)
    assert convert(std, tmp_path / "m", "--to", "merged") == 0
    assert convert("--check", other, tmp_path / "m") == 1


@pytest.mark.parametrize("where", ["dst-is-src", "dst-inside-src", "src-inside-dst", "exists"])
def test_refuses_unsafe_destinations(tmp_path, std, capsys, where):
    work = tmp_path / "work"
    work.mkdir()
    src = work / "src"
    src.mkdir()
    for p in std.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    dst = {"dst-is-src": src, "dst-inside-src": src / "out", "src-inside-dst": work, "exists": tmp_path / "x"}[where]
    if where == "exists":
        dst.mkdir()
        (dst / "keep").write_text("mine")
    before, outside = snapshot(tmp_path), sorted(tmp_path.rglob("*"))
    capsys.readouterr()
    code = convert(src, dst, "--to", "merged", *(["--force"] if where == "src-inside-dst" else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("qkv-verify: error:") and str(dst) in err[0]
    assert snapshot(tmp_path) == before and sorted(tmp_path.rglob("*")) == outside


def test_force_replaces_an_existing_destination(tmp_path, std):
    dst = tmp_path / "x"
    dst.mkdir()
    (dst / "keep").write_text("old")
    assert convert(std, dst, "--to", "merged", "--force") == 0
    assert not (dst / "keep").exists() and convert("--check", std, dst) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"], "no temporary or old folder left behind"


def test_interrupted_run_leaves_no_destination(tmp_path, std, monkeypatch):
    before = snapshot(std)
    calls = []

    def interrupt(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    real = conv._materialize
    monkeypatch.setattr(conv, "_materialize", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(std, tmp_path / "m", "--to", "merged")
    assert list(tmp_path.iterdir()) == [] and snapshot(std) == before


def test_non_finite_weights_are_warned_and_converted_exactly(tmp_path, std, capsys):
    sd = tensors(std)
    nan_q, inf_other = "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.img_mlp.net.0.proj.weight"
    sd[nan_q][0, 0] = float("nan")
    sd[inf_other][1, 2] = float("-inf")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes((std / "config.json").read_bytes())
    save_file(sd, str(src / conv.WEIGHTS))
    capsys.readouterr()
    assert convert(src, tmp_path / "m", "--to", "merged") == 0
    assert convert(tmp_path / "m", tmp_path / "s", "--to", "standard") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert any(nan_q in w and "1 NaN" in w for w in warnings) and any(inf_other in w and "1 Inf" in w
                                                                      for w in warnings)
    back = load_file(tmp_path / "s" / conv.WEIGHTS)
    assert all(as_bytes(back[k]) == as_bytes(sd[k]) for k in sd)
    assert convert("--check", src, tmp_path / "m") == 0


def test_dtypes_are_preserved_per_tensor(tmp_path, std):
    sd = tensors(std)
    mixed = {k: t.to(torch.bfloat16) if "attn" in k else t.half() if "mlp" in k else t for k, t in sd.items()}
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_bytes((std / "config.json").read_bytes())
    save_file(mixed, str(src / conv.WEIGHTS))
    assert convert(src, tmp_path / "m", "--to", "merged") == 0
    m = tensors(tmp_path / "m")
    assert m["transformer_blocks.0.attn.to_qkv.weight"].dtype == torch.bfloat16
    assert m["transformer_blocks.0.img_mlp.net.2.weight"].dtype == torch.float16
    assert convert(tmp_path / "m", tmp_path / "s", "--to", "standard") == 0
    back = tensors(tmp_path / "s")
    assert all(back[k].dtype == t.dtype and as_bytes(back[k]) == as_bytes(t) for k, t in mixed.items())


def test_usage_errors_are_one_line(tmp_path, std, capsys):
    for argv in (["--to", "sideways"], ["--naming", "nunchaku", "--to", "merged"], ["--layout", "zigzag", "--to",
                                                                                    "merged"], []):
        capsys.readouterr()
        code = convert(std, tmp_path / "m", *argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("qkv-verify: error:"), (argv, err)
    assert not (tmp_path / "m").exists()
    assert convert(std, tmp_path / "m", "--to", "standard") == 2  # already standard
    assert convert(std, tmp_path / "m", "--to", "merged") == 0
    assert convert(tmp_path / "m", tmp_path / "m2", "--to", "merged") == 2  # already merged
    assert convert(tmp_path / "m", tmp_path / "m2", "--to", "standard", "--naming", "diffusers") == 2
    assert os.listdir(tmp_path) == ["m"]


@given(dtype=st.sampled_from(["F64", "F32", "F16", "BF16"]), n=st.integers(1, 300), seed=st.integers(0, 2**16),
       specials=st.lists(st.tuples(st.integers(0, 299), st.sampled_from([float("nan"), float("inf"), -float("inf"),
                                                                          65504.0, -0.0, 1e-40])), max_size=4))
def test_scan_counts_non_finite_values_as_torch_does(dtype, n, seed, specials):
    """The exponent-mask shortcut misses no NaN or Inf in any IEEE dtype, and the hash is sha256 of the bytes."""
    import hashlib

    x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e3
    for i, value in specials:
        x[i % n] = value
    x = x.to(DTYPES[dtype])
    found = scan.Scan(dtype).update(tensor_view(x))
    assert (found.nan, found.inf) == (int(x.isnan().sum()), int(x.isinf().sum()))
    assert found.hash.hexdigest() == hashlib.sha256(as_bytes(x)).hexdigest()


def tensor_view(x: torch.Tensor) -> memoryview:
    return memoryview(bytearray(as_bytes(x)))


@pytest.mark.parametrize("dtype", ["F64", "F32", "F16", "BF16"])
def test_scan_of_finite_values_takes_the_fast_path(dtype, monkeypatch):
    def slow(_):
        raise AssertionError("finite data went to the slow count")

    monkeypatch.setattr(scan, "non_finite", slow)
    x = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 100).to(DTYPES[dtype])
    found = scan.Scan(dtype).update(tensor_view(x))
    assert (found.nan, found.inf) == (0, 0)


def test_killed_run_leaves_no_destination(tmp_path, std):
    """SIGKILL in the middle of writing (each copied tensor slowed down): DST never appears, SRC is untouched."""
    import signal
    import subprocess
    import sys
    import time

    before = snapshot(std)
    dst = tmp_path / "m"
    script = ("import sys, time; from pathlib import Path; import verify.files.convert as c\n"
              "real = c._kernel_copy\n"
              "c._kernel_copy = lambda *a: (time.sleep(0.05), real(*a))\n"
              "c.convert(Path(sys.argv[1]), Path(sys.argv[2]), 'merged')\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(std), str(dst)])
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".m.*.qkv-verify-tmp/*.safetensors")):
        assert child.poll() is None and time.monotonic() < deadline, "the child ended before it was killed"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not dst.exists() and snapshot(std) == before


def test_hash_jobs_hold_at_most_the_byte_budget_whatever_the_core_count():
    """Bytes held by queued and running hash jobs stay under the budget with 8 workers (a job count let them grow
    with the cores); a job larger than the budget runs alone; jobs still run in parallel."""
    lock, held, peak, alone = threading.Lock(), [0], [0], []

    def job(nbytes: int) -> None:
        with lock:
            held[0] += nbytes
            peak[0] = max(peak[0], held[0])
            if nbytes > 100:
                alone.append(held[0] == nbytes)
        time.sleep(0.005)
        with lock:
            held[0] -= nbytes

    with scan.Workers(workers=8, budget=100) as workers:
        for nbytes in [30, 20, 10, 40, 150, 25, 25, 25, 25] * 4:
            workers.submit(nbytes, job, nbytes)
        workers.results()
    assert peak[0] <= 150 and all(alone) and len(alone) == 4
    assert peak[0] > 40  # more than one job at a time: the budget bounds memory, not parallelism


def test_temporary_folders_of_a_killed_convert_are_removed_and_no_others(tmp_path, std, capsys):
    """A folder left beside DST by a convert whose process died is removed (and said); one of a live process, or of
    another host's process, stays."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = destination.host()
    other = "0" * 8 if host != "0" * 8 else "1" * 8
    stale, live, remote = (tmp_path / f".out.{owner}.x{destination.TMP_SUFFIX}"
                           for owner in (f"{host}-{dead.pid}", f"{host}-{os.getpid()}", f"{other}-{dead.pid}"))
    for folder in (stale, live, remote):
        folder.mkdir()
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"half-written")
    assert convert(std, tmp_path / "out", "--to", "merged") == 0
    assert not stale.exists() and live.exists() and remote.exists()
    assert f"removed {stale.name}" in capsys.readouterr().err


# --- convert --check's verdicts, word for word (mutation testing: reports/mutation/) ------------------------------


def test_check_of_a_diffusers_named_dst_without_manifest_finds_its_naming(tmp_path, std):
    dst = tmp_path / "m"
    assert convert(std, dst, "--to", "merged", "--naming", "diffusers") == 0
    verdict = conv.check(std, dst)
    assert verdict.proven and verdict.message.endswith("(naming diffusers, layout blocked); manifest matches")
    (dst / mf.NAME).unlink()
    verdict = conv.check(std, dst)
    assert verdict.proven, verdict.message
    assert verdict.message.endswith("(naming diffusers, layout blocked); DST has no manifest")


def test_check_refuses_a_layout_its_manifest_contradicts(tmp_path, std):
    dst = tmp_path / "m"
    assert convert(std, dst, "--to", "merged", "--layout", "interleaved") == 0
    with pytest.raises(conv.VerifyError) as caught:
        conv.check(std, dst, layout="blocked")
    assert str(caught.value) == f"--layout blocked contradicts {dst / mf.NAME}, which says interleaved"


def test_check_names_a_missing_tensor(tmp_path, std):
    dst = tmp_path / "m"
    assert convert(std, dst, "--to", "merged") == 0
    (dst / mf.NAME).unlink()
    index = json.loads((dst / conv.INDEX).read_text())
    gone = sorted(index["weight_map"])[0]
    shard = dst / index["weight_map"].pop(gone)
    sd = load_file(shard)
    del sd[gone]
    save_file(sd, str(shard), metadata={"format": "pt"})
    (dst / conv.INDEX).write_text(json.dumps(index))
    verdict = conv.check(std, dst)
    assert not verdict.proven and verdict.message == f"DST lacks {gone} (1 missing, 0 extra)"
