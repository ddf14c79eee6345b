"""Which requests the loop worker sends to a host together, and how a call's answer is split."""

from __future__ import annotations

import time

import numpy as np
import pytest

from serving.http.gather import (
    DEADLINE_SPAN_S,
    MAX_MEMBERS,
    Member,
    gather_key,
    joined_message,
    split_reply,
    take_groups,
)
from serving.ipc.client import infer_message
from serving.ipc.protocol import Joined, decode_tensors, encode_tensors
from tests.support.gathering import INFO, Prepared


def member(x, info=INFO, deadline=None, name="x") -> Member:
    header, buffers = infer_message("model", {name: x})
    deadline = time.time() + 60 if deadline is None else deadline
    return Member(None, Prepared(header, buffers), deadline, info)


def rows(n, start=0.0):
    return (np.arange(n * 4, dtype=np.float32) + start).reshape(n, 4)


def test_requests_of_one_shape_and_the_models_dtype_share_a_key():
    a, b = member(rows(1)), member(rows(3))
    assert a.key is not None and a.key == b.key
    assert (a.rows, b.rows) == (1, 3)


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((2, 4), np.float64),  # the host would cast it, and could refuse its values
        np.zeros((2, 5), np.float32),  # another row shape than the model's
        np.zeros((2, 4, 1), np.float32),  # another number of dimensions
        np.zeros((0, 4), np.float32),  # no rows
        np.zeros((65, 4), np.float32),  # more rows than one call may carry
    ],
)
def test_a_request_the_host_could_refuse_or_must_split_goes_alone(x):
    assert member(x).key is None


def test_a_model_that_takes_no_gathered_rows_gets_every_request_alone():
    assert member(rows(1), {**INFO, "gather_rows": 0}).key is None
    header, _ = infer_message("model", {"x": rows(1)})
    assert gather_key({**header, "op": "invoke"}, INFO) == (None, 0)


def test_a_lone_input_under_another_name_is_checked_against_the_models_lone_input():
    assert member(rows(1), name="input").key is not None
    assert member(rows(1).astype(np.int32), name="input").key is None


def test_inputs_of_different_row_counts_go_alone():
    info = {"gather_rows": 64, "signature": {"inputs": []}}
    header, buffers = infer_message("model", {"a": rows(2), "b": rows(3)})
    assert gather_key(header, info) == (None, 0)
    header, buffers = infer_message("model", {"a": rows(2), "b": rows(2)})
    assert gather_key(header, info)[1] == 2


def test_groups_keep_arrival_order_and_stop_at_the_models_rows():
    members = [member(rows(20, i)) for i in range(4)]  # 80 rows: 60 fit in one call of 64
    other = member(np.zeros((1, 5), np.float32), {**INFO, "signature": {"inputs": []}})
    groups = take_groups([members[0], other, *members[1:]])
    assert [len(g) for g in groups] == [3, 1, 1]
    assert groups[0] == members[:3] and groups[1] == [other] and groups[2] == [members[3]]


def test_answered_requests_are_left_out_and_far_apart_deadlines_split():
    now = time.time()
    a, b, c = member(rows(1), deadline=now + 60), member(rows(1), deadline=now + 60), member(rows(1))
    b.done = True
    late = member(rows(1), deadline=now + 60 + 2 * DEADLINE_SPAN_S)
    groups = take_groups([a, b, c, late])
    assert groups == [[a, c], [late]]


def test_a_group_holds_at_most_max_members():
    info = {**INFO, "gather_rows": 10 * MAX_MEMBERS}
    groups = take_groups([member(rows(1), info) for _ in range(MAX_MEMBERS + 1)])
    assert [len(g) for g in groups] == [MAX_MEMBERS, 1]


def test_a_joined_message_carries_every_members_rows_in_order():
    members = [member(rows(n, 100 * n)) for n in (1, 3, 2)]
    header, buffers = joined_message(members)
    assert header["inputs"][0]["shape"] == [6, 4]
    assert isinstance(buffers[0], Joined) and buffers[0].nbytes == 6 * 4 * 4
    joined = np.frombuffer(b"".join(bytes(p) for p in buffers[0].parts), np.float32).reshape(6, 4)
    np.testing.assert_array_equal(joined, np.concatenate([rows(1, 100), rows(3, 300), rows(2, 200)]))


def test_one_member_sends_its_own_message_unchanged():
    m = member(rows(2))
    assert joined_message([m]) == (m.prepared.header, m.prepared.buffers)


def _reply(outputs):
    specs, buffers = encode_tensors(outputs)
    return {"ok": True, "outputs": specs}, buffers


def test_each_member_gets_its_own_rows_of_the_answer():
    members = [member(rows(n)) for n in (2, 1, 3)]
    y = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    shares = split_reply(*_reply({"y": y, "id": np.arange(6)}), members)
    got = [decode_tensors(r["outputs"], b) for r, b in shares]
    np.testing.assert_array_equal(got[0]["y"], y[:2])
    np.testing.assert_array_equal(got[1]["y"], y[2:3])
    np.testing.assert_array_equal(got[2]["id"], [3, 4, 5])


def test_an_error_answer_is_every_members():
    members = [member(rows(1)), member(rows(1))]
    error = {"ok": False, "status": 429, "message": "full"}
    assert split_reply(error, [], members) == [(error, [])] * 2


def test_outputs_without_a_row_per_input_row_fail_every_member_with_500():
    members = [member(rows(1)), member(rows(2))]
    for outputs in ({"y": np.zeros((2, 2))}, {"y": np.float32(1.0).reshape(())}):
        shares = split_reply(*_reply(outputs), members)
        assert [r["status"] for r, _ in shares] == [500, 500]
        assert "one row per input row" in shares[0][0]["message"]
