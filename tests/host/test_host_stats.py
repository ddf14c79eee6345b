"""The host's ``stats`` IPC op: what each model's batcher ran, over a real Unix socket."""

from __future__ import annotations

import dataclasses
import gc
import threading
import time
import weakref

import numpy as np
import pytest

from serving import heap
from serving.host.process import Host
from serving.ipc.client import HostClient
from serving.ipc.server import IPCServer
from serving.settings import Settings
from serving.types import Device
from tests.support.models import onnx_model, reference

pytest.importorskip("onnxruntime")


@pytest.fixture
def served_host(tmp_path):
    host = Host(Settings.from_env({}), Device.parse("cpu"))
    server = IPCServer(str(tmp_path / "host.sock"), host.dispatch)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host.load_at_start("linear", onnx_model(tmp_path / "linear"))
    yield host, HostClient(server.path)
    server.close()
    host.registry.close()


def test_stats_count_the_batches_and_rows_each_model_ran(served_host):
    _, client = served_host
    before = client.stats(time.time() + 5)["models"].get("linear", {"batches": 0, "rows": 0, "requests": 0})
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for _ in range(2):
        out = client.infer("linear", {"x": x}, time.time() + 5)
        np.testing.assert_allclose(out["y"], reference(x), rtol=1e-6)
    after = client.stats(time.time() + 5)["models"]["linear"]
    # max_batch_size defaults to 1, so each 3-row request is split into 3 one-row batches
    assert after["batches"] - before["batches"] == 6
    assert after["rows"] - before["rows"] == 6
    assert after["requests"] - before["requests"] == 6
    assert after["padding"] == 0
    assert after["sizes"]["1"] - before.get("sizes", {}).get("1", 0) == 6 and set(after["sizes"]) == {"1"}


def test_stats_of_a_host_that_ran_nothing_are_empty(tmp_path):
    host = Host(Settings.from_env({}), Device.parse("cpu"))
    reply, buffers = host.dispatch({"op": "stats"}, [])
    assert reply["models"] == {} and buffers == []
    assert set(reply["gc"]) == {"frozen", "collections"} and len(reply["gc"]["collections"]) == 3


class _Node:
    """A cycle's member that a weak reference can watch."""

    def __init__(self):
        self.me = self


@pytest.mark.parametrize("freeze", [True, False])
def test_a_model_loaded_or_unloaded_leaves_the_living_frozen_and_the_dead_collected(tmp_path, freeze):
    host = Host(dataclasses.replace(Settings.from_env({}), gc_freeze=freeze), Device.parse("cpu"))
    path = str(onnx_model(tmp_path / "linear"))
    gc.unfreeze()
    try:
        host.dispatch({"op": "load", "model": "a", "path": path}, [])
        assert (heap.census()["frozen"] > 0) is freeze
        garbage = _Node()
        watch = weakref.ref(garbage)
        gc.freeze()  # frozen while it was alive, as a model's cycles are
        del garbage
        host.dispatch({"op": "unload", "model": "a"}, [])
        if freeze:  # handed back to the collector, collected, and the rest frozen again
            assert watch() is None and heap.census()["frozen"] > 0
    finally:
        gc.unfreeze()
        host.registry.close()


def test_stats_give_how_many_batches_ran_at_each_padded_size(tmp_path):
    from serving.batching import BatchStats

    host = Host(Settings.from_env({}), Device.parse("cpu"))
    for rows, padding in [(3, 1), (4, 0), (7, 1), (1, 0)]:
        host._count_batch("m", BatchStats(rows, padding, rows, (0.0,) * rows, 0.001))
    stats = host.dispatch({"op": "stats"}, [])[0]["models"]["m"]
    assert stats["sizes"] == {"1": 1, "4": 2, "8": 1}
    assert (stats["batches"], stats["rows"], stats["padding"]) == (4, 15, 2)


def test_stats_say_where_the_hosts_time_went(served_host):
    _, client = served_host
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    client.infer("linear", {"x": x}, time.time() + 5)
    stats = client.stats(time.time() + 5)["models"]["linear"]
    for key in ("queue_s", "build_s", "launch_s", "compute_s", "starved_s", "answer_s"):
        assert stats[key] >= 0.0, key
    # the host waited for its first request, and ran two batches
    assert stats["starved_s"] > 0.0 and stats["compute_s"] > 0.0


def test_calls_that_say_when_they_were_sent_are_timed_on_arrival(tmp_path):
    host = Host(Settings.from_env({}), Device.parse("cpu"))
    host.load_at_start("linear", onnx_model(tmp_path / "linear"))
    try:
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        from serving.ipc.protocol import encode_tensors

        specs, buffers = encode_tensors({"x": x})
        header = {"op": "infer", "model": "linear", "inputs": specs, "deadline": time.time() + 5}
        for pending in (
            host.dispatch({**header, "sent": time.time() - 0.25}, buffers),
            host.dispatch(header, buffers),  # no send time: not counted
        ):
            pending.future.result(5)
        stats = host.dispatch({"op": "stats"}, [])[0]["models"]["linear"]
        assert stats["arrivals"] == 1 and 0.25 <= stats["arrive_s"] < 5
    finally:
        host.registry.close()


def test_a_model_that_ran_nothing_yet_reports_its_idle_time(tmp_path):
    host = Host(Settings.from_env({}), Device.parse("cpu"))
    host.load_at_start("linear", onnx_model(tmp_path / "linear"))
    try:
        time.sleep(0.2)
        stats = host.dispatch({"op": "stats"}, [])[0]["models"]["linear"]
        assert (stats["batches"], stats["rows"], stats["sizes"]) == (0, 0, {})
        assert stats["starved_s"] >= 0.15  # counted from the batcher's start, not its first batch
    finally:
        host.registry.close()


@pytest.mark.parametrize(("toml", "threads"), [("", 1), ("copy_threads = 3\n", 3)])
def test_copy_threads_from_onebox_toml_reach_the_batcher(tmp_path, toml, threads):
    host = Host(Settings.from_env({}), Device.parse("cpu"))
    model_dir = onnx_model(tmp_path / "linear")
    (model_dir / "onebox.toml").write_text("max_batch_size = 8\n" + toml)
    host.load_at_start("linear", model_dir)
    try:
        assert host.registry.get("linear").batcher.copy_threads == threads
    finally:
        host.registry.close()
