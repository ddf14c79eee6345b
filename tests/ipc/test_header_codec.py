"""IPC headers are compact JSON, written and read without json's per-call set-up
(``protocol.dump_header`` / ``load_header``): the same bytes and values as ``json``, and the
same refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.ipc.protocol import decode_tensors, dump_header, load_header

HEADERS = [
    {
        "op": "infer",
        "model": "resnet",
        "inputs": [{"name": "x", "dtype": "|u1", "shape": [5, 3, 224, 224]}],
        "deadline": 1796410233.7697759,
        "sent": 1796410170.25,
        "shm": [752640],
        "buffers": [],
    },
    {"ok": False, "status": 400, "message": 'input "x" — bad\n\tshape', "headers": {"Retry-After": "1"}},
    {"ok": True, "outputs": [], "replied": 1e300, "custom_attributes": None, "nested": [[[]], {}]},
    {"ünïcode": "日本", "neg": -0.0, "small": 5e-324, "big": 2**70},
]


@pytest.mark.parametrize("header", HEADERS)
def test_a_header_is_written_as_json_writes_it_and_read_back_whole(header):
    raw = dump_header(header)
    assert raw == json.dumps(header, separators=(",", ":")).encode()
    assert load_header(memoryview(raw)) == header


def test_a_value_json_cannot_write_is_refused():
    with pytest.raises(TypeError, match="not JSON serializable"):
        dump_header({"shape": np.int64(3)})


@pytest.mark.parametrize("raw", [b"", b"{", b'{"a": 1} x', b"\xff\xfe", b'{"a": nope}', b"[1,]"])
def test_a_malformed_header_is_refused_as_json_refuses_it(raw):
    with pytest.raises(ValueError):
        load_header(memoryview(raw))


@pytest.mark.parametrize("raw", [b' {"a": 1}', b'{"a": 1}\n', b"[1, 2]", b"7"])
def test_what_json_reads_is_read_the_same(raw):
    assert load_header(memoryview(raw)) == json.loads(raw)


def test_a_dtype_not_allowed_on_the_wire_stays_refused_after_allowed_ones():
    ok = [{"name": "x", "dtype": "<f4", "shape": [2]}]
    for _ in range(2):  # the second time from the dtypes already seen
        assert decode_tensors(ok, [np.ones(2, np.float32).tobytes()])["x"].tolist() == [1.0, 1.0]
    for dtype in ("|O", "<M8[ns]", "|V8", 5, None, "nonsense"):
        with pytest.raises(ConnectionError):
            decode_tensors([{"name": "x", "dtype": dtype, "shape": [1]}], [b"\0" * 8])


def test_a_header_nested_too_deep_breaks_only_its_connection():
    """json gives up on deep nesting with RecursionError, not ValueError: the reader must still
    see a broken connection, not an error that would end its thread."""
    from serving.ipc.protocol import _parse_header

    with pytest.raises(ConnectionError, match="malformed IPC header"):
        _parse_header(memoryview(b"[" * 100_000 + b"]" * 100_000))
