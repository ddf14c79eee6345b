"""The pure shaping functions: row counting, grouping keys, padding, slicing, output checks."""

import numpy as np
import pytest

from serving.batching.shaping import (
    check_outputs,
    concatenate,
    count_rows,
    padded_size,
    shape_key,
    take_rows,
)
from serving.errors import BadRequest, ModelError


def test_count_rows_returns_the_shared_leading_size():
    assert count_rows({"a": np.zeros((3, 2)), "b": np.zeros(3, dtype=np.int64)}) == 3


@pytest.mark.parametrize(
    ("inputs", "words"),
    [
        ({}, "no inputs"),
        ({"a": np.float32(1.0)}, "is not an array"),
        ({"a": np.array(1.0)}, "scalar"),
        ({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, "a=3, b=4"),
        ({"a": np.zeros((0, 2))}, "no rows"),
    ],
)
def test_unbatchable_inputs_are_rejected_with_400(inputs, words):
    with pytest.raises(BadRequest, match=words):
        count_rows(inputs)


def test_shape_key_ignores_batch_size_and_input_order():
    one = {"a": np.zeros((1, 3)), "b": np.zeros((1,), dtype=np.int32)}
    many = {"b": np.zeros((7,), dtype=np.int32), "a": np.zeros((7, 3))}
    assert shape_key(one) == shape_key(many)


@pytest.mark.parametrize(
    "other",
    [
        {"a": np.zeros((1, 4))},  # non-batch dimension differs
        {"a": np.zeros((1, 3), dtype=np.float32)},  # dtype differs
        {"c": np.zeros((1, 3))},  # name differs
        {"a": np.zeros((1, 3)), "b": np.zeros(1)},  # an extra input
    ],
)
def test_shape_key_separates_incompatible_requests(other):
    assert shape_key({"a": np.zeros((1, 3))}) != shape_key(other)


@pytest.mark.parametrize(("rows", "expected"), [(1, 2), (2, 2), (3, 4), (5, 8), (8, 8)])
def test_padded_size_picks_the_smallest_allowed_size_that_fits(rows, expected):
    assert padded_size(rows, (2, 4, 8)) == expected


def test_padded_size_without_sizes_is_the_row_count_and_too_many_rows_is_an_error():
    assert padded_size(5, ()) == 5
    with pytest.raises(ValueError):
        padded_size(9, (2, 4, 8))


def test_concatenate_joins_parts_in_order_and_pads_with_the_last_row():
    parts = [{"x": np.array([[1, 1], [2, 2]])}, {"x": np.array([[3, 3]])}]
    joined = concatenate(parts, 5)
    assert joined["x"].tolist() == [[1, 1], [2, 2], [3, 3], [3, 3], [3, 3]]
    assert not np.shares_memory(joined["x"], parts[0]["x"])


def test_a_padded_batch_is_c_contiguous_so_the_runner_need_not_copy_it_again():
    # np.concatenate with a broadcast padding part lays the result out non-contiguously
    # whenever it repeats the last row more than once (it made the batch dimension innermost)
    parts = [{"x": np.full((1, 3, 4, 4), i, np.uint8)} for i in range(2)]
    joined = concatenate(parts, 4)["x"]
    assert joined.flags["C_CONTIGUOUS"]
    assert np.ascontiguousarray(joined) is joined
    assert joined.shape == (4, 3, 4, 4) and joined.dtype == np.uint8
    assert [int(row.max()) for row in joined] == [0, 1, 1, 1]


def test_concatenate_assembles_in_the_arrays_allocate_hands_out():
    staging = {"x": np.full((4, 2), -1, np.int64), "y": np.zeros((3, 2), np.int64)}
    asked = []

    def allocate(name, shape, dtype):
        asked.append((name, shape, np.dtype(dtype)))
        return staging.get(name)

    parts = [
        {"x": np.array([[1, 1]]), "y": np.array([[5, 5]])},
        {"x": np.array([[2, 2]]), "y": np.array([[6, 6]])},
    ]
    joined = concatenate(parts, 4, allocate)
    assert joined["x"] is staging["x"]
    assert staging["x"].tolist() == [[1, 1], [2, 2], [2, 2], [2, 2]]
    # a buffer of the wrong shape (or none) is not used: a fresh array is made instead
    assert joined["y"] is not staging["y"] and joined["y"].tolist() == [[5, 5], [6, 6], [6, 6], [6, 6]]
    assert asked == [("x", (4, 2), np.dtype(np.int64)), ("y", (4, 2), np.dtype(np.int64))]


def test_concatenate_of_a_single_unpadded_part_passes_the_arrays_through():
    array = np.arange(6).reshape(3, 2)
    assert concatenate([{"x": array}])["x"] is array


def test_concatenate_refuses_to_pad_below_the_row_count():
    with pytest.raises(ValueError):
        concatenate([{"x": np.zeros((3, 1))}], 2)


def test_take_rows_gives_views_unless_a_copy_is_asked_for():
    tensors = {"x": np.arange(10).reshape(5, 2)}
    view = take_rows(tensors, 1, 3)
    copy = take_rows(tensors, 1, 3, copy=True)
    assert view["x"].tolist() == copy["x"].tolist() == [[2, 3], [4, 5]]
    assert np.shares_memory(view["x"], tensors["x"])
    assert not np.shares_memory(copy["x"], tensors["x"])


def test_check_outputs_accepts_arrays_with_the_batch_rows():
    outputs = {"y": np.zeros((4, 2)), "z": np.zeros(4)}
    assert check_outputs(outputs, 4) is outputs


@pytest.mark.parametrize(
    ("outputs", "words"),
    [
        ({"y": np.zeros((3, 2))}, "model returned 3 rows for a batch of 4"),
        ({"y": np.zeros((4, 2)), "z": np.zeros(5)}, "model returned 5 rows for a batch of 4"),
        ({"y": np.array(1.0)}, "scalar"),
        ({"y": [1, 2, 3, 4]}, "expected an array"),
        (np.zeros(4), "expected a dict of arrays"),
    ],
)
def test_check_outputs_rejects_malformed_outputs_as_model_errors(outputs, words):
    with pytest.raises(ModelError, match=words):
        check_outputs(outputs, 4)
