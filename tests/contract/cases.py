"""SageMaker single-model acceptance cases (../shared/spec/sagemaker-contract.md §7) as data.

Each case names the model directory it runs against (``model``), extra environment for the
server (``env``), one HTTP request and what the response must be. Cases that need a sequence
of requests, signals or timing live in ``tests/process``; their numbers are listed in
``ELSEWHERE`` so every case 1–33 is accounted for.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np

from tests.support.models import reference

X = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 2.0, 0.0], [3.0, 0.0, -2.0, 1.0]]
Y = reference(X)


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=True)
    return buf.getvalue()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    number: int
    title: str
    method: str
    path: str
    body: bytes | None = None
    headers: dict = field(default_factory=dict)
    model: str = "onnx"  # onnx | torchscript | export | script | savedmodel
    env: tuple = ()  # extra (NAME, VALUE) pairs for the server
    status: int = 200
    content_type: str | None = None  # expected media type (parameters ignored)
    json: object = None  # expected JSON body (floats compared with tolerance)
    csv_rows: int | None = None  # expected number of CSV lines
    npy: object = None  # expected array for application/x-npy
    text: str | None = None  # expected exact body text
    error: bool = False  # body must be a JSON error without a traceback
    header_absent: str | None = None
    header_equals: tuple | None = None  # (name, value)
    empty_body: bool = False
    chunked: bool = False


JSON = {"Content-Type": "application/json"}
CSV_BODY = "\n".join(",".join(str(v) for v in row) for row in X).encode()

CASES = [
    Case(1, "ping is 200 once the model is ready", "GET", "/ping"),
    Case(8, "ping body is empty", "GET", "/ping", empty_body=True),
    Case(10, "unknown route is 404 with a JSON error", "GET", "/does-not-exist", status=404, error=True),
    Case(10, "GET /invocations is 405", "GET", "/invocations", status=405, error=True),
    Case(11, "JSON in, JSON out", "POST", "/invocations", json.dumps(X).encode(),
         {**JSON, "Accept": "application/json"}, content_type="application/json", json=Y.tolist()),
    Case(11, "JSON instances envelope", "POST", "/invocations", json.dumps({"instances": X}).encode(), JSON,
         content_type="application/json", json=Y.tolist()),
    Case(12, "CSV in, CSV out, rows in order", "POST", "/invocations", CSV_BODY,
         {"Content-Type": "text/csv", "Accept": "text/csv"}, content_type="text/csv", csv_rows=3),
    Case(13, "no Accept answers in the default type", "POST", "/invocations", json.dumps(X).encode(), JSON,
         content_type="application/json", json=Y.tolist()),
    Case(13, "the default Accept comes from SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "POST", "/invocations",
         json.dumps(X).encode(), JSON, env=(("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "text/csv"),),
         content_type="text/csv", csv_rows=3),
    Case(14, "Accept */* answers in the default type", "POST", "/invocations", json.dumps(X).encode(),
         {**JSON, "Accept": "*/*"}, content_type="application/json", json=Y.tolist()),
    Case(15, "Accept npy returns a loadable array", "POST", "/invocations", json.dumps(X).encode(),
         {**JSON, "Accept": "application/x-npy"}, content_type="application/x-npy", npy=Y),
    Case(16, "npy request", "POST", "/invocations", _npy(np.asarray(X, dtype=np.float32)),
         {"Content-Type": "application/x-npy"}, content_type="application/json", json=Y.tolist()),
    Case(16, "pickled npy is refused", "POST", "/invocations", _npy(np.array([{"x": 1}], dtype=object)),
         {"Content-Type": "application/x-npy"}, status=400, error=True),
    Case(17, "npz with a named input", "POST", "/invocations", _npz(x=np.asarray(X, dtype=np.float32)),
         {"Content-Type": "application/x-npz"}, content_type="application/json", json=Y.tolist()),
    Case(18, "first supported Accept wins", "POST", "/invocations", json.dumps(X).encode(),
         {**JSON, "Accept": "image/png, text/csv"}, content_type="text/csv", csv_rows=3),
    Case(19, "charset parameter is tolerated", "POST", "/invocations", json.dumps(X).encode(),
         {"Content-Type": "application/json; charset=utf-8"}, content_type="application/json", json=Y.tolist()),
    Case(20, "unsupported Content-Type is 415", "POST", "/invocations", b"<x/>",
         {"Content-Type": "application/xml"}, status=415, error=True),
    Case(21, "only unsupported Accept types is 406", "POST", "/invocations", json.dumps(X).encode(),
         {**JSON, "Accept": "image/png, application/xml"}, status=406, error=True),
    Case(22, "malformed JSON is 400", "POST", "/invocations", b"[[1, 2,", JSON, status=400, error=True),
    Case(23, "empty body is 400", "POST", "/invocations", b"", JSON, status=400, error=True),
    Case(24, "a body over the limit is 413", "POST", "/invocations", b"[" + b" " * (6 * 1024 * 1024) + b"]",
         JSON, status=413, error=True),
    Case(24, "a body at exactly 6 MiB is not refused as too large", "POST", "/invocations",
         json.dumps(X).encode().ljust(6 * 1024 * 1024), JSON, content_type="application/json", json=Y.tolist()),
    Case(26, "unknown SageMaker and other headers are ignored", "POST", "/invocations", json.dumps(X).encode(),
         {**JSON, "X-Amzn-SageMaker-Inference-Id": "abc", "X-Amzn-SageMaker-Target-Variant": "v1", "X-Foo": "bar"},
         content_type="application/json", json=Y.tolist()),
    Case(24, "chunked request body", "POST", "/invocations", json.dumps(X).encode(), JSON,
         content_type="application/json", json=Y.tolist(), chunked=True),
    Case(24, "a chunked body over the limit is 413", "POST", "/invocations", b" " * (6 * 1024 * 1024 + 10), JSON,
         status=413, error=True, chunked=True),
    # the same answers from the torch kinds
    Case(11, "TorchScript: JSON in, JSON out", "POST", "/invocations", json.dumps(X).encode(), JSON,
         model="torchscript", content_type="application/json", json=Y.tolist()),
    Case(15, "TorchScript: npy out", "POST", "/invocations", json.dumps(X).encode(),
         {**JSON, "Accept": "application/x-npy"}, model="torchscript", content_type="application/x-npy", npy=Y),
    Case(11, "ExportedProgram: JSON in, JSON out", "POST", "/invocations", json.dumps(X).encode(), JSON,
         model="export", content_type="application/json", json=Y.tolist()),
    Case(12, "ExportedProgram: CSV", "POST", "/invocations", CSV_BODY,
         {"Content-Type": "text/csv", "Accept": "text/csv"}, model="export", content_type="text/csv", csv_rows=3),
    Case(22, "ExportedProgram: wrong shape is 400", "POST", "/invocations", json.dumps([[1, 2, 3]]).encode(),
         JSON, model="export", status=400, error=True),
    # a TensorFlow SavedModel (its serving_default signature)
    Case(11, "SavedModel: JSON in, JSON out", "POST", "/invocations", json.dumps(X).encode(), JSON,
         model="savedmodel", content_type="application/json", json=Y.tolist()),
    Case(12, "SavedModel: CSV", "POST", "/invocations", CSV_BODY,
         {"Content-Type": "text/csv", "Accept": "text/csv"}, model="savedmodel", content_type="text/csv", csv_rows=3),
    Case(15, "SavedModel: npy in, npy out", "POST", "/invocations", _npy(np.asarray(X, dtype=np.float32)),
         {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}, model="savedmodel",
         content_type="application/x-npy", npy=Y),
    Case(22, "SavedModel: wrong shape is 400", "POST", "/invocations", json.dumps([[1, 2, 3]]).encode(),
         JSON, model="savedmodel", status=400, error=True),
    # custom inference.py that imports sagemaker_inference
    Case(11, "script: JSON in, JSON out", "POST", "/invocations", json.dumps(X).encode(),
         {**JSON, "Accept": "application/json"}, model="script", content_type="application/json", json=Y.tolist()),
    Case(12, "script: CSV through the toolkit decoder and encoder", "POST", "/invocations", CSV_BODY,
         {"Content-Type": "text/csv", "Accept": "text/csv"}, model="script", content_type="text/csv", csv_rows=3),
    Case(25, "script: no custom attributes set, header absent", "POST", "/invocations", json.dumps(X).encode(),
         {**JSON, "X-Amzn-SageMaker-Custom-Attributes": "trace=abc"}, model="script",
         header_absent="x-amzn-sagemaker-custom-attributes"),
    Case(27, "script: toolkit error keeps its status", "POST", "/invocations", b"[]",
         {"Content-Type": "application/x-fail"}, model="script", status=422, error=True),
    Case(27, "script: generic exception is 500 without a traceback", "POST", "/invocations", b"[1, 2, 3]", JSON,
         model="script", status=500, error=True),
]  # fmt: skip

#: cases run by tests/process (sequences, signals, timing, special models)
ELSEWHERE = {2, 3, 4, 5, 6, 7, 9, 25, 28, 29, 30, 31, 32, 33}
