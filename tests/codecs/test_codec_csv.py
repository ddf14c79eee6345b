"""text/csv requests and responses (cases 12, 55)."""

import numpy as np
import pytest

from serving.codecs import decode, encode
from serving.errors import BadRequest, NotAcceptable
from serving.types import TensorSpec

CSV = "text/csv"
FEATURES = (TensorSpec("features", "float32", (-1, 4)),)


def test_rows_become_a_2d_array_of_the_input_dtype():
    tensors = decode(b"5.1,3.5,1.4,0.2\n6.7,3.0,5.2,2.3\n4.9,2.4,3.3,1.0\n", CSV, FEATURES)
    assert tensors["features"].dtype == np.float32
    assert tensors["features"].shape == (3, 4)
    np.testing.assert_array_equal(tensors["features"][1], np.array([6.7, 3.0, 5.2, 2.3], np.float32))


def test_windows_line_ends_byte_order_mark_and_blank_trailing_lines_are_fine():
    tensors = decode(b"\xef\xbb\xbf1,2,3,4\r\n5,6,7,8\r\n\r\n", CSV, FEATURES)
    assert tensors["features"].shape == (2, 4)


def test_one_row_is_a_batch_of_one():
    assert decode(b"1,2,3,4", CSV, FEATURES)["features"].shape == (1, 4)


def test_without_a_signature_rows_are_float64_named_input():
    tensors = decode(b"1,2\n3,4\n", CSV)
    assert tensors["input"].dtype == np.float64
    assert tensors["input"].shape == (2, 2)


def test_a_rank_one_input_gets_a_flat_array():
    spec = (TensorSpec("x", "float32", (-1,)),)
    assert decode(b"1\n2\n3\n", CSV, spec)["x"].shape == (3,)


def test_rows_are_reshaped_to_a_higher_rank_input():
    spec = (TensorSpec("image", "float32", (-1, 2, 3)),)
    assert decode(b"1,2,3,4,5,6\n6,5,4,3,2,1\n", CSV, spec)["image"].shape == (2, 2, 3)


def test_large_int64_values_survive_exactly():
    spec = (TensorSpec("ids", "int64", (-1, 2)),)
    tensors = decode(b"9223372036854775807,-9223372036854775808\n", CSV, spec)
    assert tensors["ids"].tolist() == [[2**63 - 1, -(2**63)]]


def test_whole_floats_for_an_integer_input_are_accepted():
    spec = (TensorSpec("ids", "int32", (-1, 2)),)
    assert decode(b"1.0,2\n", CSV, spec)["ids"].dtype == np.int32


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"1,2,3,4\n1,2\n", "number of columns"),
        (b"1,2,a,4\n", "could not convert"),
        (b"1,,3,4\n", "could not convert"),
        (b"x1,x2,x3,x4\n1,2,3,4\n", "could not convert"),
        (b"\xff\xfe1,2\n", "UTF-8"),
        (b"\n\n", "no rows"),
    ],
)
def test_malformed_csv_answers_400_with_a_short_reason(body, reason):
    with pytest.raises(BadRequest, match=reason) as caught:
        decode(body, CSV, FEATURES)
    assert caught.value.message.startswith("malformed CSV")
    assert len(caught.value.message) < 200


def test_2d_output_is_one_row_per_line_in_order():
    body = encode({"y": np.array([[0.1, 0.9], [0.7, 0.3], [1.0, 0.0]], np.float32)}, CSV)
    assert body == b"0.1,0.9\n0.7,0.3\n1.0,0.0\n"


def test_1d_output_is_one_value_per_line():
    assert encode({"label": np.array([2, 0, 1])}, CSV) == b"2\n0\n1\n"


def test_higher_rank_output_flattens_each_row():
    assert encode({"y": np.arange(8).reshape(2, 2, 2)}, CSV) == b"0,1,2,3\n4,5,6,7\n"


def test_scalar_and_boolean_outputs_are_numbers():
    assert encode({"y": np.float64(0.5)}, CSV) == b"0.5\n"
    assert encode({"y": np.array([True, False])}, CSV) == b"1\n0\n"


def test_string_outputs_cannot_be_csv():
    with pytest.raises(NotAcceptable, match="numbers only"):
        encode({"y": np.array(["a,b"])}, CSV)
