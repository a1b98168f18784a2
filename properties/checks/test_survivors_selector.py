"""Metric paths as a claims file's author meets them: the words of every refusal (selector, summary_schema), the
claims file's own checks (claims) and the filter values a run is known to hold (report.run_values). Written for
mutants that survived the mutation run over the verdict, message and write modules."""

from __future__ import annotations

import pytest
import torch

from verify.checks.claims import UNMEASURED, judge, load_claims
from verify.checks.report import run_values
from verify.checks.selector import SelectError, parse, resolve
from verify.checks.summary_schema import CHECK_PREFIXES, check_path
from verify.errors import VerifyError

# --- selector.parse / resolve --------------------------------------------------------------------------------------


def test_an_empty_or_blank_path_is_called_empty():
    for path in ("", "   "):
        with pytest.raises(SelectError, match="empty"):
            parse(path)
    with pytest.raises(SelectError, match="metric path None: empty"):
        parse(None)


@pytest.mark.parametrize("path", ["a[k=]", "a[k= ]", "a[k=v,j=]"])
def test_a_filter_without_a_value_is_refused(path):
    with pytest.raises(SelectError, match="is not field=value"):
        parse(path)


RECORDS = {"rows": [{"dtype": "fp32", "v": 1}, {"dtype": "fp64", "v": 2}]}


def test_a_filter_that_matches_no_record_lists_the_values_present():
    with pytest.raises(SelectError) as e:
        resolve(RECORDS, "rows[dtype=bf16].v")
    assert str(e.value) == ("metric path 'rows[dtype=bf16].v': no record of rows has dtype=bf16 "
                            "(present: dtype: fp32, fp64)")


def test_more_than_eight_values_present_are_cut_short():
    data = {"rows": [{"i": i} for i in range(10)]}
    with pytest.raises(SelectError) as e:
        resolve(data, "rows[i=99]")
    # sorted as text: 0, 1, 2, ... 9; the first eight shown
    assert str(e.value).endswith("(present: i: 0, 1, 2, 3, 4, 5, 6, 7, ...)")


def test_an_index_out_of_range_says_the_size_or_the_type():
    with pytest.raises(SelectError) as e:
        resolve({"a": [1, 2, 3]}, "a[3]")
    assert str(e.value) == "metric path 'a[3]': index 3 out of range at a (3)"
    with pytest.raises(SelectError) as e:
        resolve({"a": {"b": 1}}, "a[0]")
    assert str(e.value) == "metric path 'a[0]': index 0 out of range at a (dict)"


# --- summary_schema.check_path -------------------------------------------------------------------------------------

VALUES = run_values([torch.float32])


def test_an_unknown_top_level_key_lists_the_keys_summary_json_has():
    with pytest.raises(SelectError) as e:
        check_path("summary.verdict", VALUES)
    message = str(e.value)
    assert message.startswith("metric path 'summary.verdict': no key 'summary' in summary.json here (has: ")
    assert "candidate, checks, claims, compared" in message, message


def test_a_key_below_a_value_says_there_is_only_a_value():
    with pytest.raises(SelectError) as e:
        check_path("verdict.detail", VALUES)
    assert str(e.value) == "metric path 'verdict.detail': no key 'detail' in summary.json here (has: a value)"


def test_a_bad_filter_field_names_the_path():
    with pytest.raises(SelectError) as e:
        check_path("checks[nam=model/t2i/outputs].max_abs_err", VALUES)
    assert str(e.value).startswith("metric path 'checks[nam=model/t2i/outputs].max_abs_err': records of checks have "
                                   "no field 'nam'")


def test_an_unknown_check_name_lists_the_prefixes_check_names_start_with():
    with pytest.raises(SelectError) as e:
        check_path("checks[name=modle/t2i/outputs].max_abs_err", VALUES)
    listed = str(e.value).partition("(names start with ")[2].removesuffix(")")
    assert listed.split(", ") == list(CHECK_PREFIXES)
    assert {"weights/", "inputs/", "attention/", "block/", "model/", "lora/"} <= set(CHECK_PREFIXES)


def test_an_index_into_a_list_section_is_accepted_and_into_a_value_refused():
    check_path("checks[0].max_abs_err", VALUES)
    check_path("verdict_reasons[2]", VALUES)
    with pytest.raises(SelectError, match="verdict is not a list; it takes no \\[N\\]"):
        check_path("verdict[0]", VALUES)


@pytest.mark.parametrize("component", ["weights", "inputs", "attention", "block", "model", "lora"])
def test_a_filter_on_any_component_a_report_writes_is_accepted(component):
    check_path(f"checks[component={component},dtype=fp32].max_abs_err", VALUES)
    with pytest.raises(SelectError, match="component=blocks selects nothing in this run"):
        check_path("checks[component=blocks,dtype=fp32].max_abs_err", VALUES)


# --- claims --------------------------------------------------------------------------------------------------------


def test_a_claim_whose_text_is_not_a_string_is_refused_saying_so(tmp_path):
    path = tmp_path / "claims.yaml"
    path.write_text("- {id: a, metric: verdict, op: '==', expected: pass, text: 3}")
    with pytest.raises(VerifyError) as e:
        load_claims(path)
    assert str(e.value) == f"claims file {path}: claim 'a' (#1): text must be a string"


def test_a_null_metric_is_an_unmeasured_row_of_the_claim():
    claim = {"id": "ratio-small", "metric": "ratio", "op": "<", "expected": 1}
    assert judge(claim, {"ratio": None}) == {
        "id": "ratio-small", "claim": "ratio < 1", "verdict": UNMEASURED, "measured": None, "expected": 1,
        "detail": "ratio is null in this run", "source": "user"}


def test_an_order_claim_on_a_boolean_is_refused_not_compared_as_a_number():
    claim = {"id": "b", "metric": "passed", "op": "<", "expected": 2}
    with pytest.raises(VerifyError, match="claim 'b': metric 'passed' is True, not a number"):
        judge(claim, {"passed": True})
