"""Outcome keeps the Future contract the batcher, registry and IPC server rely on."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, InvalidStateError

import pytest

from serving.batching import Outcome


def test_a_result_set_on_another_thread_wakes_a_waiting_caller():
    outcome = Outcome()
    threading.Timer(0.05, outcome.set_result, args=("rows",)).start()
    assert outcome.result(timeout=5) == "rows"
    assert outcome.done() and outcome.exception() is None


def test_an_error_is_raised_by_result_and_returned_by_exception():
    outcome = Outcome()
    outcome.set_exception(ValueError("bad batch"))
    with pytest.raises(ValueError, match="bad batch"):
        outcome.result()
    assert isinstance(outcome.exception(), ValueError)


def test_result_times_out_with_timeout_error_and_can_still_be_settled_later():
    outcome = Outcome()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        outcome.result(timeout=0.05)
    assert time.monotonic() - started >= 0.04
    outcome.set_result(1)
    assert outcome.result(timeout=0) == 1


def test_a_cancelled_outcome_never_runs_and_wakes_its_waiter():
    outcome = Outcome()
    threading.Timer(0.05, outcome.cancel).start()
    with pytest.raises(CancelledError):
        outcome.result(timeout=5)
    assert outcome.cancelled() and outcome.done()
    assert outcome.set_running_or_notify_cancel() is False
    with pytest.raises(InvalidStateError):
        outcome.set_result("too late")


def test_a_running_outcome_cannot_be_cancelled():
    outcome = Outcome()
    assert outcome.set_running_or_notify_cancel() is True
    assert outcome.cancel() is False
    with pytest.raises(RuntimeError):
        outcome.set_running_or_notify_cancel()
    outcome.set_result("ok")
    assert outcome.result() == "ok"


def test_it_settles_once():
    outcome = Outcome()
    outcome.set_result(1)
    with pytest.raises(InvalidStateError):
        outcome.set_result(2)
    with pytest.raises(InvalidStateError):
        outcome.set_exception(ValueError())
    assert outcome.result() == 1


def test_callbacks_run_once_on_settling_and_at_once_when_already_settled():
    outcome, seen = Outcome(), []
    outcome.add_done_callback(lambda o: seen.append(("early", o.result())))
    outcome.add_done_callback(lambda o: 1 / 0)  # a failing callback is logged, not raised
    outcome.add_done_callback(lambda o: seen.append(("early2", o.result())))
    assert seen == []
    outcome.set_result(7)
    outcome.add_done_callback(lambda o: seen.append(("late", o.result())))
    assert seen == [("early", 7), ("early2", 7), ("late", 7)]


def test_callbacks_run_when_cancelled():
    outcome, seen = Outcome(), []
    outcome.add_done_callback(lambda o: seen.append(o.cancelled()))
    assert outcome.cancel() and outcome.cancel()  # cancelling twice is still cancelled
    assert seen == [True]
