"""Property: any finite float32 / int64 array of 1-3 dimensions survives encode -> decode."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from serving.codecs import decode, encode
from serving.types import TensorSpec

arrays = st.sampled_from([np.float32, np.int64]).flatmap(
    lambda dtype: hnp.arrays(
        dtype,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5),
        elements={"allow_nan": False, "allow_infinity": False} if dtype == np.float32 else None,
    )
)


def _spec(array: np.ndarray) -> TensorSpec:
    return TensorSpec("x", array.dtype.str, (-1, *array.shape[1:]))


def _assert_round_trip(array: np.ndarray, media_type: str) -> None:
    decoded = decode(encode({"x": array}, media_type), media_type, (_spec(array),))["x"]
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


@settings(max_examples=150)
@given(arrays)
def test_json_round_trip_is_exact(array):
    _assert_round_trip(array, "application/json")


@settings(max_examples=150)
@given(arrays)
def test_npy_round_trip_is_exact(array):
    _assert_round_trip(array, "application/x-npy")


@settings(max_examples=150)
@given(arrays)
def test_npz_round_trip_is_exact(array):
    _assert_round_trip(array, "application/x-npz")


@settings(max_examples=150)
@given(arrays)
def test_csv_round_trip_is_exact_for_every_rank(array):
    _assert_round_trip(array, "text/csv")


@settings(max_examples=50)
@given(st.dictionaries(st.text("abcxyz_", min_size=1, max_size=8), arrays, min_size=2, max_size=4))
def test_several_outputs_round_trip_through_json_and_npz(outputs):
    specs = tuple(TensorSpec(name, a.dtype.str, (-1, *a.shape[1:])) for name, a in outputs.items())
    for media_type in ("application/json", "application/x-npz"):
        decoded = decode(encode(outputs, media_type), media_type, specs)
        assert decoded.keys() == outputs.keys()
        for name, array in outputs.items():
            np.testing.assert_array_equal(decoded[name], array)
