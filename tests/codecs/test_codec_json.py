"""application/json request shapes, dtype casting and responses (cases 11, 19, 22)."""

import json

import numpy as np
import pytest

from serving.codecs import decode, encode
from serving.errors import BadRequest, NotAcceptable
from serving.types import TensorSpec

JSON = "application/json"
FEATURES = (TensorSpec("features", "float32", (-1, 4)),)
TWO_INPUTS = (TensorSpec("ids", "int64", (-1, 3)), TensorSpec("mask", "bool", (-1, 3)))


def test_bare_list_is_the_single_input_cast_to_its_dtype():
    tensors = decode(b"[[5.1, 3.5, 1.4, 0.2]]", JSON, FEATURES)
    assert list(tensors) == ["features"]
    assert tensors["features"].dtype == np.float32
    np.testing.assert_array_equal(tensors["features"], np.array([[5.1, 3.5, 1.4, 0.2]], np.float32))


def test_integers_for_a_float_input_become_floats():
    assert decode(b"[[1, 2, 3, 4]]", JSON, FEATURES)["features"].dtype == np.float32


def test_without_a_signature_the_single_array_is_named_input_and_keeps_json_types():
    tensors = decode(b"[[1, 2], [3, 4]]", JSON)
    assert list(tensors) == ["input"]
    assert tensors["input"].dtype == np.int64


def test_instances_are_rows_of_the_single_input():
    tensors = decode(b'{"instances": [[1, 2, 3, 4], [5, 6, 7, 8]]}', JSON, FEATURES)
    assert tensors["features"].shape == (2, 4)


def test_inputs_list_is_the_single_input():
    assert decode(b'{"inputs": [[1, 2, 3, 4]]}', JSON, FEATURES)["features"].shape == (1, 4)


def test_inputs_object_names_each_input_and_casts_each():
    body = b'{"inputs": {"ids": [[1, 2, 3]], "mask": [[1, 0, 1]]}}'
    tensors = decode(body, JSON, TWO_INPUTS)
    assert tensors["ids"].dtype == np.int64
    assert tensors["mask"].dtype == np.bool_
    np.testing.assert_array_equal(tensors["mask"], [[True, False, True]])


def test_plain_object_of_known_input_names_is_named_inputs():
    tensors = decode(b'{"mask": [[true, false, true]], "ids": [[1, 2, 3]]}', JSON, TWO_INPUTS)
    assert set(tensors) == {"ids", "mask"}


def test_plain_object_without_a_signature_takes_any_names():
    tensors = decode(b'{"a": [1.5], "b": [[1]]}', JSON)
    assert tensors["a"].dtype == np.float64
    assert tensors["b"].shape == (1, 1)


def test_unknown_input_name_is_rejected_naming_the_expected_ones():
    with pytest.raises(BadRequest, match="unknown input.*wrong.*ids, mask"):
        decode(b'{"ids": [[1, 2, 3]], "wrong": [[1, 0, 1]]}', JSON, TWO_INPUTS)


def test_missing_named_input_is_rejected():
    with pytest.raises(BadRequest, match="missing input.*mask"):
        decode(b'{"inputs": {"ids": [[1, 2, 3]]}}', JSON, TWO_INPUTS)


def test_single_array_for_a_model_with_several_inputs_is_rejected():
    with pytest.raises(BadRequest, match="2 inputs"):
        decode(b"[[1, 2, 3]]", JSON, TWO_INPUTS)


@pytest.mark.parametrize(
    "body",
    [b"[[1, 2", b"{'a': 1}", b"not json", b"\xff\xfe\x00garbage", b"[" * 100_000],
)
def test_malformed_json_answers_400_with_a_short_reason(body):
    with pytest.raises(BadRequest) as caught:
        decode(body, JSON, FEATURES)
    assert caught.value.message.startswith("malformed JSON")
    assert "Traceback" not in caught.value.message
    assert len(caught.value.message) < 200


def test_ragged_lists_answer_400():
    with pytest.raises(BadRequest, match="ragged"):
        decode(b"[[1, 2, 3, 4], [1, 2]]", JSON, FEATURES)


@pytest.mark.parametrize("body", [b'[["a", "b", "c", "d"]]', b'[["1.5", 2, 3, 4]]', b"[[1, null, 3, 4]]"])
def test_strings_and_nulls_for_a_float_input_answer_400(body):
    with pytest.raises(BadRequest, match="features"):
        decode(body, JSON, FEATURES)


def test_strings_are_rejected_without_a_signature_too():
    with pytest.raises(BadRequest, match="strings"):
        decode(b'["a", "b"]', JSON)


def test_fractional_values_for_an_integer_input_answer_400():
    with pytest.raises(BadRequest, match="ids"):
        decode(b'{"ids": [[1.5, 2, 3]], "mask": [[1, 0, 1]]}', JSON, TWO_INPUTS)


def test_whole_floats_for_an_integer_input_are_accepted():
    tensors = decode(b'{"ids": [[1.0, 2.0, 3.0]], "mask": [[1, 0, 1]]}', JSON, TWO_INPUTS)
    np.testing.assert_array_equal(tensors["ids"], [[1, 2, 3]])


def test_out_of_range_values_for_a_narrow_integer_input_answer_400():
    with pytest.raises(BadRequest, match="out of range"):
        decode(b"[300, 1]", JSON, (TensorSpec("x", "uint8", (-1,)),))


def test_numbers_other_than_0_and_1_for_a_bool_input_answer_400():
    with pytest.raises(BadRequest, match="booleans"):
        decode(b'{"ids": [[1, 2, 3]], "mask": [[2, 0, 1]]}', JSON, TWO_INPUTS)


def test_one_output_is_a_bare_list_with_short_float32_digits():
    body = encode({"probabilities": np.array([[0.1, 0.7, 0.2]], np.float32)}, JSON)
    assert body == b"[[0.1,0.7,0.2]]"


def test_several_outputs_are_an_object_keyed_by_name():
    body = encode({"label": np.array([2, 0]), "score": np.array([0.5, 0.25], np.float64)}, JSON)
    assert json.loads(body) == {"label": [2, 0], "score": [0.5, 0.25]}


def test_non_finite_floats_are_written_as_python_json_tokens():
    for dtype in (np.float32, np.float64):
        body = encode({"y": np.array([np.nan, np.inf, -np.inf, 1.0], dtype)}, JSON)
        assert body == b"[NaN,Infinity,-Infinity,1.0]"
        assert np.array_equal(np.array(json.loads(body)), [np.nan, np.inf, -np.inf, 1.0], equal_nan=True)


def test_scalar_and_empty_outputs_are_valid_json():
    assert json.loads(encode({"y": np.float32(2.5)}, JSON)) == 2.5
    assert json.loads(encode({"y": np.zeros((2, 0), np.float32)}, JSON)) == [[], []]


def test_outputs_json_cannot_hold_are_not_acceptable():
    with pytest.raises(NotAcceptable, match="x-npz"):
        encode({"y": np.array([b"\xff"], dtype=object)}, JSON)
