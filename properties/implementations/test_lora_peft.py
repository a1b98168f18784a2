"""PEFT is the ground truth: a trained adapter's forward equals the model with the LoRA applied at the audited scale.

Standard and merged (fused QKV) models, adapters trained on either layout, every scale convention PEFT has; the same
check rejects each planted bug (wrong multiplier, wrong third, wrong split order, shared A, a skipped module).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from properties.maths.test_lora_algebra import fuse_into_k_third, fuse_sharing_first_A, split_in_kqv_order
from verify.checks.compare import Record, assert_failed, assert_passed, compare, compare_exact
from verify.checks.lora_audit import audit
from verify.checks.probes import count_calls
from verify.checks.tolerance import ALLCLOSE
from verify.cli import main
from verify.files import lora_formats as formats
from verify.files import lora_mapping as mapping
from verify.implementations.candidate import DEFAULT_FUSED_MODULES
from verify.implementations.fused import fuse_model
from verify.maths import lora as algebra
from verify.maths.naming import streams
from verify.maths.state_dict import merge_state_dict
from verify.models.qwen_image import CONFIGS, FIXTURES, build_model, model_inputs

CONFIG = CONFIGS["tiny"]
HEAD_DIM = CONFIG["attention_head_dim"]
EXPENSIVE = settings(deadline=None, max_examples=min(25, settings.default.max_examples))
OTHER_TARGETS = ("to_out.0", "to_add_out", "img_mod.1", "txt_mlp.net.2")


@dataclass(frozen=True)
class Case:
    """One adapter: the layout it was trained on, the layout it is loaded into, and its PEFT LoraConfig."""

    seed: int
    trained_on: str  # "standard" | "merged"
    load_into: str
    naming: str
    layout: str
    r: int
    alpha: float
    rslora: bool
    targets: tuple[str, ...]
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def config(self) -> LoraConfig:
        return LoraConfig(r=self.r, lora_alpha=self.alpha, use_rslora=self.rslora, init_lora_weights=False,
                          target_modules=list(self.targets), rank_pattern=dict(self.rank_pattern),
                          alpha_pattern=dict(self.alpha_pattern))


def qkv_names(layout: str, naming: str) -> tuple[str, ...]:
    image, text = streams(naming)
    return (image.fused, text.fused) if layout == "merged" else (*image.separate, *text.separate)


@st.composite
def cases(draw) -> Case:
    trained_on, naming = draw(st.sampled_from(("standard", "merged"))), draw(st.sampled_from(("seed", "diffusers")))
    names = qkv_names(trained_on, naming) + OTHER_TARGETS
    targets = tuple(draw(st.lists(st.sampled_from(names), min_size=1, max_size=5, unique=True)))
    patterned = draw(st.sampled_from(targets))
    return Case(
        seed=draw(st.integers(0, 2**16)), trained_on=trained_on,
        load_into=draw(st.sampled_from(("standard", "merged"))),
        naming=naming, layout=draw(st.sampled_from(("blocked", "interleaved"))), r=draw(st.integers(1, 4)),
        alpha=draw(st.sampled_from((1.0, 3.0, 4.0, 16.0))), rslora=draw(st.booleans()), targets=targets,
        rank_pattern=((patterned, draw(st.integers(1, 3))),) if draw(st.booleans()) else (),
        alpha_pattern=((patterned, 2.5),) if draw(st.booleans()) else (),
    )


def model(layout: str, case: Case) -> torch.nn.Module:
    m = build_model(CONFIG, case.seed)
    return fuse_model(m, case.naming, case.layout) if layout == "merged" else m


def train(case: Case, folder: Path) -> tuple[torch.nn.Module, Path]:
    """The adapter PEFT builds (random A and B: init_lora_weights=False), saved as diffusers does."""
    trained = model(case.trained_on, case)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        inject_adapter_in_model(case.config(), trained)
    torch.nn.Module.to(trained, torch.float64)
    sd = {f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(trained).items()}
    path = folder / "adapter.safetensors"
    save_file(sd, path, metadata={"lora_adapter_metadata": json.dumps(case.config().to_dict(), default=list)})
    return trained, path


def forward(m: torch.nn.Module, case: Case) -> tuple[torch.Tensor, int]:
    with torch.no_grad(), count_calls(m, DEFAULT_FUSED_MODULES) as calls:
        out = m(**model_inputs(CONFIG, FIXTURES["text-to-image"], case.seed)).sample
    return out, sum(calls.values())


def load(case: Case, path: Path) -> tuple[torch.nn.Module, mapping.LoadReport, dict]:
    """The target model with the file applied at the audited scale (per module where the audit has no single one)."""
    m = model(case.load_into, case)
    lora = formats.read(path)
    spec = mapping.spec_of(m, case.layout)
    record = audit(lora, mapping.plan(lora, spec))
    report, _ = mapping.apply(m, mapping.plan(lora, spec, record["scale"]["value"]))
    return m, report, record


def peft_check(case: Case, folder: Path) -> Record:
    """Output of the PEFT-adapted model vs the LoRA-loaded one, fp64; fused calls counted on a merged target."""
    trained, path = train(case, folder)
    ref, _ = forward(trained, case)
    loaded, _, _ = load(case, path)
    out, calls = forward(loaded, case)
    return compare("peft adapter vs loaded LoRA", "lora", {"out": ref}, {"out": out}, ALLCLOSE, torch.float64, "cpu",
                   fused_calls=calls if case.load_into == "merged" else None)


@EXPENSIVE
@given(cases())
def test_loaded_lora_matches_peft(tmp_path_factory, case):
    assert_passed(peft_check(case, tmp_path_factory.mktemp("peft")))


@EXPENSIVE
@given(cases())
def test_converted_lora_matches_peft(tmp_path_factory, case):
    """lora-convert to the target's layout carries each module's scale: the written file loads at the same effect.
    An adapter already in that layout (or with no q/k/v module to move) is refused: exit 2, nothing written."""
    folder = tmp_path_factory.mktemp("peft")
    trained, path = train(case, folder)
    converted = folder / "converted.safetensors"
    moves = case.trained_on != case.load_into and bool(set(case.targets) & set(qkv_names(case.trained_on,
                                                                                          case.naming)))
    assert main(["lora-convert", str(path), str(converted), "--to", case.load_into, "--naming", case.naming,
                 "--layout", case.layout, "--config", "tiny"]) == (0 if moves else 2)
    if not moves:
        assert not converted.exists()
        return
    assert formats.read(converted).alpha_source == "alpha keys"
    loaded, _, _ = load(case, converted)
    (ref, _), (out, calls) = forward(trained, case), forward(loaded, case)
    assert_passed(compare("peft adapter vs converted LoRA", "lora", {"out": ref}, {"out": out}, ALLCLOSE,
                          torch.float64, "cpu", fused_calls=calls if case.load_into == "merged" else None))


@EXPENSIVE
@given(cases())
def test_merged_load_equals_merged_standard_load(tmp_path_factory, case):
    """Loading into the merged model = loading into the standard one, then merging its weights (fp64 rounding)."""
    _, path = train(case, tmp_path_factory.mktemp("peft"))
    standard, _, _ = load(Case(**{**case.__dict__, "load_into": "standard"}), path)
    merged, report, _ = load(Case(**{**case.__dict__, "load_into": "merged"}), path)
    expected = merge_state_dict(standard.state_dict(), case.naming, case.layout, HEAD_DIM)
    actual = merged.state_dict()
    assert set(expected) == set(actual)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-13, atol=1e-13, msg=lambda m, k=key: f"{k}: {m}")
    assert report.modules_matched == len(formats.read(path).pairs)


@EXPENSIVE
@given(cases())
def test_multiplier_zero_is_the_base_model_and_remove_restores_it(tmp_path_factory, case):
    _, path = train(case, tmp_path_factory.mktemp("peft"))
    base = model(case.load_into, case).state_dict()
    m = model(case.load_into, case)
    spec = mapping.spec_of(m, case.layout)
    lora = formats.read(path)
    _, saved = mapping.apply(m, mapping.plan(lora, spec, multiplier=0.0))
    assert_passed(compare_exact("multiplier 0", "lora", base, m.state_dict()))
    mapping.remove(m, saved)
    _, saved = mapping.apply(m, mapping.plan(lora, spec))
    assert not compare_exact("applied", "lora", base, m.state_dict()).passed, "the LoRA changed nothing"
    mapping.remove(m, saved)
    assert_passed(compare_exact("apply then remove", "lora", base, m.state_dict()))


@given(st.integers(1, 64), st.sampled_from((0.5, 1.0, 8.0, 32.0, 100.0)), st.booleans())
def test_convention_is_peft_scaling(r, alpha, rslora):
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["0"]), layer)
    assert algebra.multiplier(alpha, r, rslora) == pytest.approx(layer[0].scaling["default"], rel=1e-15)


# --- planted bugs: the same PEFT check must fail ------------------------------------------------------------------

def case(trained_on: str, load_into: str, targets: tuple[str, ...], **kw) -> Case:
    return Case(**{**dict(seed=3, trained_on=trained_on, load_into=load_into, naming="seed", layout="blocked", r=4,
                          alpha=8.0, rslora=False, targets=targets), **kw})


def alpha_without_rank(alpha, rank, rslora=False):
    """Bug: multiplies by alpha instead of alpha / rank."""
    return 1.0 if alpha is None else alpha


def skip_last_update(factors, spec, others):
    """Bug: one module silently skipped."""
    return REAL_UPDATES(factors, spec, others)[:-1]


REAL_UPDATES = mapping._updates
SEPARATE = ("to_q", "to_k", "to_v", "add_k_proj")
PLANTED = {
    "alpha instead of alpha/rank": (algebra, "multiplier", alpha_without_rank, case("standard", "standard", SEPARATE)),
    "q LoRA on the k third": (algebra, "fuse", fuse_into_k_third, case("standard", "merged", ("to_q",))),
    "B split in k, q, v order": (algebra, "split", split_in_kqv_order, case("merged", "standard", ("to_qkv",))),
    "A shared where the three differ": (algebra, "fuse", fuse_sharing_first_A, case("standard", "merged", SEPARATE)),
    "a skipped module": (mapping, "_updates", skip_last_update, case("standard", "standard", SEPARATE)),
}


@pytest.mark.parametrize("name", PLANTED)
def test_planted_bug_is_caught(name, tmp_path, monkeypatch):
    module, attr, bug, planted_case = PLANTED[name]
    assert_passed(peft_check(planted_case, tmp_path))
    monkeypatch.setattr(module, attr, bug)
    assert_failed(peft_check(planted_case, tmp_path))
