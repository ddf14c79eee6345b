"""A loop worker's call and its requests are freed as soon as the call ends, by reference
counting alone: a request's body must not wait for the garbage collector (serving.heap)."""

from __future__ import annotations

import gc
import time
import weakref

import numpy as np
import pytest

from serving.http.connection import Call
from serving.http.gather import Member
from serving.ipc.client import infer_message
from serving.ipc.protocol import encode_tensors
from tests.support.gathering import INFO, Prepared


class _Conn:
    closed = False
    answered_at = 0.0

    def __init__(self):
        self.answers = []

    def respond(self, status, headers, body):
        self.answers.append(status)


class _Sock:
    def fileno(self):
        return 7


class _Link:
    sock = _Sock()

    def __init__(self, message):
        self.message, self.closed = message, False

    def receive(self):
        return self.message

    def close(self):
        self.closed = True


class _Client:
    def finished(self):
        pass

    def release(self, link):
        pass


class _Timings:
    def answered(self, *stamps):
        pass


class _Invocations:
    def failed(self, err):
        return 504, [], b"late"


class _Worker:
    def __init__(self, client):
        self.calls = {client: 1}
        self.timings, self.invocations = _Timings(), _Invocations()

    def unwatch(self, fd):
        pass


def _reply(rows: int):
    specs, buffers = encode_tensors({"y": np.zeros((rows, 2), dtype=np.float32)})
    return {"ok": True, "outputs": specs}, buffers


@pytest.mark.parametrize("ending", ["answered", "expired"])
def test_a_call_and_its_requests_are_freed_without_the_collector_once_it_ends(ending):
    client, conns = _Client(), [_Conn(), _Conn()]
    inputs = [np.ones((n, 4), dtype=np.float32) for n in (1, 2)]
    refs = [weakref.ref(x) for x in inputs]
    members = []
    for conn, x in zip(conns, inputs, strict=True):
        header, buffers = infer_message("model", {"x": x})
        members.append(Member(conn, Prepared(header, buffers), time.time() + 60, INFO))
    del inputs, x, buffers
    call = Call(_Worker(client), members)
    call.client, call.link = client, _Link(_reply(3))
    call.went()
    enabled = gc.isenabled()
    gc.disable()
    try:
        if ending == "answered":
            call.event(0)
        else:
            for member in members:
                call.expire(member, (504, [], b"late"))
            del member
        assert [c.answers for c in conns] == ([[200], [200]] if ending == "answered" else [[504], [504]])
        del call, members
        assert [r() is None for r in refs] == [True, True]  # each request's rows went with its answer
    finally:
        if enabled:
            gc.enable()


def test_a_call_at_a_host_is_what_its_requests_deadlines_end():
    client = _Client()
    header, buffers = infer_message("model", {"x": np.ones((1, 4), dtype=np.float32)})
    member = Member(_Conn(), Prepared(header, buffers), time.time() + 60, INFO)
    call = Call(_Worker(client), [member])
    assert member.call is None  # not sent yet: the worker answers a deadline itself
    call.client, call.link = client, _Link(_reply(1))
    call.went()
    assert member.call is call
    link = call.link
    call.expire(member, (504, [], b"late"))
    assert link.closed and member.call is None
