"""`qkv-verify regress` on small summaries made here: the count of compared values when a LoRA section is on one side
only, the sweep's item names, sweep keys of mixed types, the note of a check that became bit-identical, and the
help of the command's arguments. Written for mutants that survived the mutation run over the verdict, message and
write modules."""

from __future__ import annotations

import pytest

from properties.checks.test_regress import _tiny, _tiny_lora
from verify.checks.regress import regress
from verify.cli import main

TINY_COMPARED = 7 + 3 + 3 * 6  # 7 check fields, 3 samples, 6 fields of 3 statistics records


def test_a_lora_section_in_one_run_only_counts_as_one_compared_value():
    for base, cand in ((_tiny(), _tiny_lora()), (_tiny_lora(), _tiny())):
        result = regress(base, cand)
        assert result["compared"] == TINY_COMPARED + 1
        assert [m["name"] for m in result["moved"]] == ["lora"]


def test_sweeps_of_other_factors_are_one_item_named_lora_sweep():
    cand = _tiny_lora()
    cand["lora"]["sweep"][1]["factor"] = 4.0
    result = regress(_tiny_lora(), cand)
    assert result["moved"] == [{"name": "lora.sweep", "baseline": [("t2i", 1.0), ("t2i", 2.0)],
                                "candidate": [("t2i", 1.0), ("t2i", 4.0)], "delta": None, "threshold": None,
                                "detail": "the sweeps ran other fixtures or factors"}]
    assert result["compared"] == TINY_COMPARED + 5 + 1 + 1, "5 counts, the scale, the sweep as one item"


def test_sweep_records_keyed_by_values_of_mixed_types_are_compared_not_a_crash():
    """A hand-edited summary whose sweep has a null factor beside numbered ones: compared like any other record
    (the records are ordered by their key's text, as every section's are), not a TypeError from ordering None
    against a number."""
    base = _tiny_lora()
    base["lora"]["sweep"][0]["factor"] = None
    cand = _tiny_lora()
    cand["lora"]["sweep"][0]["factor"] = None
    cand["lora"]["sweep"][0]["merged_mean"] = 1.0
    cand["lora"]["sweep"][1]["merged_mean"] = 1.0
    moved = regress(base, cand)["moved"]
    assert [m["name"] for m in moved] == ["lora.sweep[fixture=t2i,factor=2.0].merged_mean",
                                          "lora.sweep[fixture=t2i,factor=None].merged_mean"]


def test_a_check_that_became_bit_identical_is_a_note_naming_its_field():
    base = _tiny()
    base["checks"][0]["bit_identical"] = False
    result = regress(base, _tiny())
    assert result["passed"]
    assert result["notes"] == ["checks[name=model/t2i/outputs,dtype=fp32].bit_identical became true "
                               "(not a regression)"]


def test_regress_help_says_what_each_argument_takes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["regress", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "baseline the stored summary.json (or a report folder holding one)" in text
    assert "candidate the new run's summary.json (or report folder)" in text
    assert "--json JSON_OUT also write the result as JSON to this file" in text
