"""application/x-npy and application/x-npz (cases 15, 16, 17)."""

import io
import pickle
import zipfile

import numpy as np
import pytest

from serving.codecs import decode, encode
from serving.codecs.npy_codec import _read_npy
from serving.errors import BadRequest, NotAcceptable
from serving.types import TensorSpec

NPY, NPZ = "application/x-npy", "application/x-npz"
IMAGE = (TensorSpec("image", "uint8", (-1, 224, 224, 3)),)


def _npy(array, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_npy_body_is_viewed_without_a_copy():
    image = np.random.default_rng(0).integers(0, 255, (1, 224, 224, 3), dtype=np.uint8)
    body = _npy(image)
    tensors = decode(body, NPY, IMAGE)
    np.testing.assert_array_equal(tensors["image"], image)
    assert np.shares_memory(tensors["image"], np.frombuffer(body, np.uint8))


def test_npy_is_cast_to_the_input_dtype():
    tensors = decode(_npy(np.ones((2, 4))), NPY, (TensorSpec("features", "float32", (-1, 4)),))
    assert tensors["features"].dtype == np.float32


def test_fortran_order_npy_keeps_its_values():
    array = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    np.testing.assert_array_equal(decode(_npy(array), NPY)["input"], array)


def test_pickled_npy_is_rejected_with_400():
    body = _npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(BadRequest, match="pickled arrays are not accepted"):
        decode(body, NPY)


def test_raw_pickle_is_rejected_with_400():
    with pytest.raises(BadRequest, match="pickled"):
        decode(pickle.dumps(np.zeros(3)), NPY)


@pytest.mark.parametrize("cut", [8, 20, -1])
def test_truncated_npy_answers_400(cut):
    with pytest.raises(BadRequest, match="malformed npy"):
        decode(_npy(np.zeros((4, 4)))[:cut], NPY)


def test_garbage_npy_answers_400():
    with pytest.raises(BadRequest, match="malformed npy"):
        decode(b"definitely not an array", NPY)


def test_npy_header_claiming_a_huge_shape_answers_400():
    body = _npy(np.zeros(2)).replace(b"(2,)", b"(99999999999,)")
    with pytest.raises(BadRequest, match="truncated"):
        decode(body, NPY)


def test_npy_output_loads_with_np_load():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(np.load(io.BytesIO(encode({"y": array}, NPY))), array)


def test_several_outputs_as_npy_answer_406():
    with pytest.raises(NotAcceptable, match="application/x-npz"):
        encode({"a": np.zeros(1), "b": np.zeros(1)}, NPY)


def test_object_outputs_cannot_be_npy():
    with pytest.raises(NotAcceptable, match="pickling"):
        encode({"y": np.array([None, 1], dtype=object)}, NPY)


def test_npz_members_are_named_inputs():
    spec = (TensorSpec("ids", "int64", (-1, 3)), TensorSpec("mask", "bool", (-1, 3)))
    tensors = decode(_npz(ids=np.array([[1, 2, 3]], np.int32), mask=np.array([[1, 0, 1]])), NPZ, spec)
    assert tensors["ids"].dtype == np.int64
    assert tensors["mask"].tolist() == [[True, False, True]]


def test_npz_without_a_signature_keeps_member_names():
    assert set(decode(_npz(a=np.zeros(1), b=np.ones(2)), NPZ)) == {"a", "b"}


def test_pickled_npz_member_is_rejected_with_400():
    buffer = io.BytesIO()
    np.savez(buffer, x=np.array([{}], dtype=object))
    with pytest.raises(BadRequest, match="pickled arrays are not accepted"):
        decode(buffer.getvalue(), NPZ)


@pytest.mark.parametrize("body", [b"not a zip", _npz(a=np.zeros(3))[:40], b"PK\x03\x04" + b"\x00" * 40])
def test_malformed_npz_answers_400(body):
    with pytest.raises(BadRequest, match="malformed npz"):
        decode(body, NPZ)


def test_npz_member_that_is_not_an_array_answers_400():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", b"plain text")
    with pytest.raises(BadRequest, match="malformed npz"):
        decode(buffer.getvalue(), NPZ)


def test_npz_output_holds_every_output_even_one_named_file():
    outputs = {"file": np.arange(3), "scores": np.ones((2, 2), np.float32)}
    with np.load(io.BytesIO(encode(outputs, NPZ))) as archive:
        assert set(archive.files) == {"file", "scores"}
        np.testing.assert_array_equal(archive["scores"], outputs["scores"])


def test_npz_that_expands_beyond_the_limit_answers_400(monkeypatch):
    from serving.codecs import npy_codec

    monkeypatch.setattr(npy_codec, "MAX_NPZ_BYTES", 1000)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros(10_000))
    with pytest.raises(BadRequest, match="expands beyond"):
        decode(buffer.getvalue(), NPZ)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(6, dtype="<f4").reshape(2, 3),
        np.arange(5, dtype=np.int64),  # shape "(5,)"
        np.array(2.5, dtype=np.float64),  # shape "()"
        np.ones((2, 3), np.float16, order="F"),
        np.zeros((0, 4), bool),
        np.arange(6, dtype=">i4").reshape(3, 2),
    ],
    ids=["2d", "1d", "scalar", "fortran", "empty-bool", "big-endian"],
)
def test_npy_headers_read_alike_with_and_without_numpys_parser(array):
    body = _npy(array)
    d = np.lib.format.header_data_from_array_1_0(array)
    # the same array with the header's keys in another order: only numpy's parser takes that
    reordered = (
        f"{{'shape': {d['shape']!r}, 'fortran_order': {d['fortran_order']}, 'descr': {d['descr']!r}, }}"
    )
    for sent in (body, _rebuild(body, reordered)):
        got = _read_npy(sent)
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
    if array.flags.c_contiguous:  # the cached output header is the one numpy writes
        assert encode({"y": array}, NPY) == body


def _rebuild(body: bytes, header: str) -> bytes:
    """``body`` with its .npy header replaced (padded to 64 bytes as numpy does)."""
    head_len = int.from_bytes(body[8:10], "little")
    raw = header.encode()
    raw += b" " * (-(10 + len(raw) + 1) % 64) + b"\n"
    return body[:8] + len(raw).to_bytes(2, "little") + raw + body[10 + head_len :]
