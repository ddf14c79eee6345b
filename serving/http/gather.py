"""Several requests in one host call: the ``loop`` worker's gathering (serving.http.loop).

A model host spends ~0.16 ms of Python on each message it receives (read and parse it, queue
it, answer it), under one GIL: ~6,000 messages/s per host, far less than a GPU's images/s.
So a loop worker sends the requests that are ready together — for the same model, with the
same input names, dtypes and row shapes — as one message of all their rows. The host's batcher
sees one request of that many rows (it would have put them in one batch anyway); the answer's
rows are split back, and each request is answered by its own ``Prepared.finish``, as if it had
gone alone. What may go together is decided before anything is sent (:func:`gather_key`):
a request the host might refuse on its own (another dtype than the model's, inputs of
different row counts, names the model does not have) always goes alone, so that its error is
its own.

What goes together is what is ready in one turn of the worker's loop: at low load each request
goes alone, as before, and under load a call carries what arrived meanwhile. With
``ONEBOX_FRONTEND_MAX_CALLS`` = N > 0, requests arriving while the worker has N calls in flight
at every host also wait in the worker and leave together when an answer comes back; that makes
calls larger but the host's queue shorter, and it cost throughput in every measurement so far
(benchmarks/RESULTS.md), so the default is 0: no limit.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from serving.errors import ModelError
from serving.ipc.protocol import Joined, decode_tensors, encode_tensors

if TYPE_CHECKING:
    from serving.http.app import Prepared
    from serving.http.connection import Call, Connection

#: requests in one call at most: its buffers leave in one ``sendmsg`` (IOV_MAX is 1024)
MAX_MEMBERS = 256
#: requests whose deadlines lie further apart than this do not go together (the host holds a
#: call to its latest member's deadline; an earlier member is answered 504 by the worker)
DEADLINE_SPAN_S = 1.0


class Member:
    """One request in a call: its connection, its prepared message, its deadline."""

    __slots__ = ("conn", "prepared", "deadline", "timeout", "key", "rows", "limit", "call", "done", "read_at")

    def __init__(self, conn: Connection, prepared: Prepared, deadline: float, info: dict | None = None):
        self.conn, self.prepared, self.deadline = conn, prepared, deadline
        self.timeout = deadline - time.time()
        self.key, self.rows = gather_key(prepared.header, info) if info is not None else (None, 0)
        self.limit = info.get("gather_rows", 0) if self.key is not None else 0
        self.call: Call | None = None  # the call it is out in, while that is at a host
        self.done = False  # answered (or its client is gone)
        self.read_at = 0.0  # perf_counter() when its body was whole (serving.http.timings)


def gather_key(header: dict, info: dict) -> tuple[tuple | None, int]:
    """``(key, rows)`` of an ``infer`` message that may share a call with others of the same key,
    or ``(None, 0)`` when it must go alone."""
    if header.get("op") != "infer" or not info.get("gather_rows"):
        return None, 0
    specs = header["inputs"]
    expected = _expected(info)
    if not specs or expected is None:
        return None, 0
    rows = None
    key: list = [header["model"]]
    for spec in specs:
        shape = spec["shape"]
        if not shape or (rows is not None and shape[0] != rows):
            return None, 0
        rows = shape[0]
        if expected:
            want = (
                expected.get(spec["name"], expected.get(None))
                if len(specs) == 1
                else expected.get(spec["name"])
            )
            if want is None or np.dtype(spec["dtype"]) != want[0] or not _fits(shape, want[1]):
                return None, 0  # the host would cast it, or refuse it: alone, so the error is its own
        key.append((spec["name"], spec["dtype"], *shape[1:]))
    if not rows or rows > info["gather_rows"]:
        return None, 0
    return tuple(key), rows


def _fits(shape: list, declared: list) -> bool:
    """Whether a shape has the declared dimensions after the first (-1: any)."""
    if not declared or declared == [-1]:
        return True
    return len(shape) == len(declared) and all(
        d < 0 or d == n for n, d in zip(shape[1:], declared[1:], strict=True)
    )


def _expected(info: dict) -> dict | None:
    """The model's inputs by name as ``(dtype, shape)`` (under ``None`` too when it has one input);
    {} when it declares none. Kept in the (briefly cached) description."""
    expected = info.get("_expected")
    if expected is None:
        inputs = (info.get("signature") or {}).get("inputs") or []
        try:
            expected = {i["name"]: (np.dtype(i["dtype"]), list(i["shape"])) for i in inputs}
        except TypeError:
            return None  # a dtype numpy does not know: leave the checks to the host
        if len(inputs) == 1:
            expected[None] = expected[inputs[0]["name"]]
        info["_expected"] = expected
    return expected


def take_groups(waiting: list[Member]) -> list[list[Member]]:
    """The waiting requests as calls: members of one key together, in arrival order, up to the
    model's ``gather_rows`` rows and ``MAX_MEMBERS`` each, deadlines within ``DEADLINE_SPAN_S``."""
    groups: list[list[Member]] = []
    open_: dict[tuple, tuple[list[Member], int]] = {}  # key -> (group, rows in it)
    for member in waiting:
        if member.done:
            continue
        if member.key is None:
            groups.append([member])
            continue
        entry = open_.get(member.key)
        if entry is not None:
            group, rows = entry
            first = group[0]
            if (
                rows + member.rows <= member.limit
                and len(group) < MAX_MEMBERS
                and abs(member.deadline - first.deadline) <= DEADLINE_SPAN_S
            ):
                group.append(member)
                open_[member.key] = (group, rows + member.rows)
                continue
        group = [member]
        groups.append(group)
        open_[member.key] = (group, member.rows)
    return groups


def joined_message(members: list[Member]) -> tuple[dict, list]:
    """The header and buffers of one call carrying every member's rows, in order."""
    if len(members) == 1:
        prepared = members[0].prepared
        return prepared.header, prepared.buffers
    first = members[0].prepared.header
    rows = sum(m.rows for m in members)
    specs = [{**spec, "shape": [rows, *spec["shape"][1:]]} for spec in first["inputs"]]
    buffers = [Joined([m.prepared.buffers[i] for m in members]) for i in range(len(specs))]
    return {"op": "infer", "model": first["model"], "inputs": specs}, buffers


def split_reply(reply: dict, buffers: list, members: list[Member]) -> list[tuple[dict, list]]:
    """Each member's share of a call's answer, as the ``(reply, buffers)`` it would have had alone.

    An error is every member's; outputs without a row per input row (which a batch of several
    requests could not have split either) fail every member.
    """
    if len(members) == 1 or not reply.get("ok"):
        return [(reply, buffers)] * len(members)
    rows = sum(m.rows for m in members)
    outputs = decode_tensors(reply["outputs"], buffers)
    if any(a.ndim == 0 or a.shape[0] != rows for a in outputs.values()):
        error = ModelError("the model's outputs do not have one row per input row")
        failed = {"ok": False, "status": int(error.status), "message": error.message}
        return [(failed, [])] * len(members)
    shares, start = [], 0
    for member in members:
        stop = start + member.rows
        specs, out = encode_tensors({name: a[start:stop] for name, a in outputs.items()})
        shares.append(({**reply, "outputs": specs}, out))
        start = stop
    return shares
