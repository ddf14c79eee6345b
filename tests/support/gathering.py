"""What the frontend's gathering tests share: a model description, and a prepared request."""

from __future__ import annotations

#: a model that takes float32 rows of 4 and gathers up to 64 rows into one host call
INFO = {
    "raw": False,
    "gather_rows": 64,
    "signature": {"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]},
}


class Prepared:
    """A request ready for a host (``serving.http.app.Prepared``'s message half); its answer is
    a fixed 200."""

    def __init__(self, header, buffers):
        self.header, self.buffers = header, buffers

    def finish(self, reply, buffers):
        return 200, [], b"answer"
