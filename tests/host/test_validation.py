"""Decoded inputs are renamed, cast and shape-checked against the signature before queueing."""

from __future__ import annotations

import numpy as np
import pytest

from serving.errors import BadRequest
from serving.host.validation import conform_inputs
from serving.types import BatchMode, Signature, TensorSpec

ONE_INPUT = Signature(inputs=(TensorSpec("x", "float32", (-1, 4)),))
TWO_INPUTS = Signature(inputs=(TensorSpec("ids", "int64", (-1, 3)), TensorSpec("mask", "bool", (-1, 3))))
INT_INPUT = Signature(inputs=(TensorSpec("ids", "int32", (-1, 2)),))


def _bad(inputs, signature, match):
    with pytest.raises(BadRequest, match=match) as info:
        conform_inputs(inputs, signature)
    assert info.value.status == 400


def test_a_lone_input_is_renamed_to_the_models_input():
    x = np.ones((2, 4), dtype=np.float32)
    out = conform_inputs({"instances": x}, ONE_INPUT)
    assert list(out) == ["x"]
    assert out["x"] is x


def test_several_inputs_must_be_named_exactly():
    ids, mask = np.zeros((1, 3), np.int64), np.ones((1, 3), bool)
    assert set(conform_inputs({"ids": ids, "mask": mask}, TWO_INPUTS)) == {"ids", "mask"}
    _bad({"ids": ids, "other": mask}, TWO_INPUTS, "expected ids, mask; got ids, other")
    _bad({"ids": ids}, TWO_INPUTS, "expected ids, mask")


def test_an_unknown_extra_input_is_refused():
    x = np.ones((1, 4), np.float32)
    _bad({"x": x, "y": x}, ONE_INPUT, "inputs do not match")


def test_json_numbers_are_cast_to_the_models_float_dtype():
    out = conform_inputs({"x": np.array([[1, 2, 3, 4]], dtype=np.int64)}, ONE_INPUT)
    assert out["x"].dtype == np.float32
    np.testing.assert_array_equal(out["x"], [[1, 2, 3, 4]])


def test_whole_valued_floats_are_cast_into_an_integer_input():
    out = conform_inputs({"ids": np.array([[3.0, -1.0]])}, INT_INPUT)
    assert out["ids"].dtype == np.int32
    np.testing.assert_array_equal(out["ids"], [[3, -1]])


@pytest.mark.parametrize("value", [1.5, np.nan, np.inf])
def test_non_integer_floats_into_an_integer_input_are_400(value):
    _bad({"ids": np.array([[1.0, value]])}, INT_INPUT, "must be int32, got non-integer values")


def test_strings_into_a_numeric_input_are_400():
    _bad({"x": np.array([["a", "b", "c", "d"]])}, ONE_INPUT, "must be float32")


def test_booleans_are_cast_to_a_numeric_input():
    out = conform_inputs({"x": np.array([[True, False, True, False]])}, ONE_INPUT)
    np.testing.assert_array_equal(out["x"], [[1.0, 0.0, 1.0, 0.0]])


def test_wrong_rank_is_400_naming_the_expected_shape():
    _bad({"x": np.ones(4, np.float32)}, ONE_INPUT, r"must have 2 dimensions \[\?, 4\], got \[4\]")


def test_wrong_feature_dimension_is_400():
    _bad({"x": np.ones((2, 3), np.float32)}, ONE_INPUT, r"must have shape \[\?, 4\], got \[2, 3\]")


def test_any_number_of_rows_is_accepted_but_not_zero():
    assert conform_inputs({"x": np.ones((7, 4), np.float32)}, ONE_INPUT)["x"].shape == (7, 4)
    _bad({"x": np.ones((0, 4), np.float32)}, ONE_INPUT, "has no rows")


def test_the_leading_dimension_is_not_checked_for_a_fixed_batch_artifact():
    fixed = Signature(inputs=(TensorSpec("x", "float32", (4, 4)),), batch=BatchMode.FIXED, batch_sizes=(4,))
    # the batcher pads 1 row up to 4, so a single row must pass validation
    assert conform_inputs({"x": np.ones((1, 4), np.float32)}, fixed)["x"].shape == (1, 4)


def test_every_dimension_is_checked_without_a_batch_dimension():
    unbatched = Signature(inputs=(TensorSpec("image", "float32", (3, 2)),), batch=BatchMode.NONE)
    assert conform_inputs({"image": np.ones((3, 2))}, unbatched)["image"].shape == (3, 2)
    _bad({"image": np.ones((2, 2))}, unbatched, r"must have shape \[3, 2\], got \[2, 2\]")


def test_a_signature_without_inputs_passes_inputs_through():
    inputs = {"anything": np.array(["text"])}
    assert conform_inputs(inputs, Signature()) is inputs


SIGNATURES = [
    ONE_INPUT,
    Signature(inputs=(TensorSpec("image", "uint8", (-1, 3, 4, 4)),)),
    Signature(inputs=(TensorSpec("x", "float32", (4, 4)),), batch=BatchMode.FIXED, batch_sizes=(4,)),
    Signature(inputs=(TensorSpec("x", "float32", (-1, -1)),)),
    Signature(inputs=(TensorSpec("x", "float32", (3, 2)),), batch=BatchMode.NONE),
    Signature(inputs=(TensorSpec("x", "float32", (-1,)),)),
]
ARRAYS = [
    np.ones((2, 4), np.float32),
    np.ones((1, 4), ">f4"),  # the right type in the other byte order: cast
    np.ones((0, 4), np.float32),
    np.ones((2, 5), np.float32),
    np.ones((2, 4, 1), np.float32),
    np.ones((2, 4), np.float64),
    np.ones((3, 2), np.float32),
    np.ones((5, 3, 4, 4), np.uint8),
    np.ones((0, 3, 4, 4), np.uint8),
    np.ones((5, 3, 4, 5), np.uint8),
    np.ones((5, 3, 4, 4), np.int8),
    np.ones(7, np.float32),
]


def _outcome(call, inputs, signature):
    try:
        return {name: (a.dtype.str, a.shape, a.tobytes()) for name, a in call(inputs, signature).items()}
    except BadRequest as exc:
        return exc.message


@pytest.mark.parametrize("signature", SIGNATURES, ids=lambda s: str([t.shape for t in s.inputs]))
def test_the_quick_check_of_a_lone_input_gives_what_the_full_check_gives(signature):
    from serving.host.validation import _conform

    for array in ARRAYS:
        for name in ("x", "image", "other"):
            inputs = {name: array}
            assert _outcome(conform_inputs, inputs, signature) == _outcome(_conform, inputs, signature)
    two = {"x": ARRAYS[0], "image": ARRAYS[7]}
    assert _outcome(conform_inputs, two, signature) == _outcome(_conform, two, signature)


def test_each_signature_is_checked_against_its_own_shape():
    small = Signature(inputs=(TensorSpec("x", "float32", (-1, 2)),))
    large = Signature(inputs=(TensorSpec("x", "float32", (-1, 3)),))
    assert conform_inputs({"x": np.ones((1, 2), np.float32)}, small)["x"].shape == (1, 2)
    _bad({"x": np.ones((1, 2), np.float32)}, large, "must have shape")
    _bad({"x": np.ones((1, 3), np.float32)}, small, "must have shape")
