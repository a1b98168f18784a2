"""Properties of the exact comparison every round trip relies on: it passes equal bits and rejects one changed bit."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from properties.strategies import float_dtypes, frames, random_tensor, seeds
from verify.compare import assert_failed, assert_passed, compare_exact

SAME_SIZE_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                 torch.float16: torch.int16}


@given(frames(), float_dtypes(), seeds(), st.booleans(), st.data())
def test_compare_exact_sees_one_changed_element(frame, dtype, seed, transpose, data):
    t = random_tensor(frame.shape(3), seed=seed, dtype=dtype, specials=True)
    t = t.transpose(0, -1) if transpose else t  # non-contiguous when ndim > 1
    assert_passed(compare_exact("same", "compare", {"t": t}, {"t": t.clone()}))
    changed = t.clone().reshape(-1)
    i = data.draw(st.integers(0, changed.numel() - 1), label="element")
    bits = changed.view(SAME_SIZE_INT[dtype])
    bits[i] ^= torch.iinfo(bits.dtype).min  # flip the sign bit: also tells 0.0 from -0.0 and one NaN from another
    record = compare_exact("changed", "compare", {"t": t}, {"t": changed.reshape(t.shape)})
    assert_failed(record)
    assert record.message.startswith("first differing tensor: t:")


@given(float_dtypes(), seeds())
def test_compare_exact_takes_zero_dim_tensors(dtype, seed):
    t = random_tensor((), seed=seed, dtype=dtype)
    assert_passed(compare_exact("scalar", "compare", {"t": t}, {"t": t.clone()}))
    assert_failed(compare_exact("scalar", "compare", {"t": t}, {"t": t + 1}))


@given(seeds())
def test_compare_exact_rejects_missing_and_reshaped_tensors(seed):
    t = random_tensor((2, 3), seed=seed, dtype=torch.float32)
    assert_failed(compare_exact("missing", "compare", {"a": t, "b": t}, {"a": t}))
    assert_failed(compare_exact("extra", "compare", {"a": t}, {"a": t, "b": t}))
    assert_failed(compare_exact("reshaped", "compare", {"a": t}, {"a": t.reshape(3, 2)}))
    assert_failed(compare_exact("recast", "compare", {"a": t}, {"a": t.double()}))
