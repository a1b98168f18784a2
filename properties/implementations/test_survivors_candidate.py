"""--fused-modules as a user types it: names made of underscores only are refused, with the words that say what is
expected. Written for mutants that survived the mutation run over the verdict, message and write modules."""

from __future__ import annotations

import pytest

from verify.errors import VerifyError
from verify.implementations.candidate import parse_fused_modules, resolve


@pytest.mark.parametrize("text", ["_", "to_qkv,__", "to qkv"])
def test_a_name_that_is_not_a_module_name_is_refused_saying_what_is_expected(text):
    with pytest.raises(VerifyError) as e:
        resolve("reference", fused_modules=text)
    assert str(e.value) == f"--fused-modules {text!r}: expected a comma list of module names, or none"


def test_names_with_underscores_and_none_are_accepted():
    assert parse_fused_modules("to_qkv, add_qkv_proj") == ("to_qkv", "add_qkv_proj")
    assert parse_fused_modules("none") == ()
