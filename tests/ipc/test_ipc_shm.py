"""Large request buffers through a connection's shared region instead of the socket."""

from __future__ import annotations

import json
import mmap
import os
import socket
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from serving.errors import DeadlineExceeded
from serving.ipc.client import HostClient
from serving.ipc.protocol import (
    SHM_MIN_BYTES,
    Joined,
    decode_tensors,
    encode_tensors,
    send_message,
    shm_supported,
)
from serving.ipc.server import IPCServer, Pending

pytestmark = pytest.mark.skipif(not shm_supported(), reason="needs Linux memfd_create and SCM_RIGHTS")

BIG = (64, 3, 32, 32)  # 196 KiB of uint8: over the 64 KiB threshold


def image(seed: int, shape=BIG) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)


@pytest.fixture
def host(tmp_path):
    """A host that answers each image's checksum and records how its buffers arrived."""
    seen: list[str] = []
    slow: list[int] = []  # sums of what slow calls still read after sleeping

    def dispatch(header, buffers):
        shared = isinstance(buffers[0], memoryview) and type(buffers[0].obj).__name__ == "mmap"
        seen.append("shm" if shared else "socket")
        x = decode_tensors(header["inputs"], buffers)["x"]
        if header["op"] == "slow":
            time.sleep(0.5)
            slow.append(int(x.astype(np.int64).sum()))
        specs, out = encode_tensors(
            {"sum": np.array([x.astype(np.int64).sum()]), "first": x.reshape(-1)[:8].copy()}
        )
        return {"outputs": specs}, out

    path = str(tmp_path / "host.sock")
    server = IPCServer(path, dispatch)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield path, seen, slow
    server.close()


def ask(client: HostClient, x: np.ndarray, op: str = "infer", timeout: float = 5.0) -> dict:
    specs, buffers = encode_tensors({"x": x})
    header, out = client.call({"op": op, "inputs": specs}, buffers, time.time() + timeout)
    return decode_tensors(header["outputs"], out)


def test_large_tensors_arrive_through_shared_memory_and_small_ones_through_the_socket(host):
    path, seen, _ = host
    client = HostClient(path)
    for seed in range(5):  # the region is rewritten for each call on the same connection
        x = image(seed)
        out = ask(client, x)
        assert out["sum"][0] == x.astype(np.int64).sum()
        np.testing.assert_array_equal(out["first"], x.reshape(-1)[:8])
    small = image(9, (1, 4))
    assert ask(client, small)["sum"][0] == small.astype(np.int64).sum()
    assert seen == ["shm"] * 5 + ["socket"]


def test_a_request_larger_than_the_region_gets_a_new_one(host):
    path, seen, _ = host
    client = HostClient(path)
    for shape in (BIG, (8, 3, 224, 224), BIG):  # 196 KiB, then 1.2 MiB: past the first 1 MiB region
        x = image(len(shape), shape)
        assert ask(client, x)["sum"][0] == x.astype(np.int64).sum()
    assert seen == ["shm"] * 3


def test_the_threshold_can_turn_shared_memory_off(host):
    path, seen, _ = host
    x = image(3)
    assert ask(HostClient(path, shm_min_bytes=None), x)["sum"][0] == x.astype(np.int64).sum()
    assert seen == ["socket"]


def test_concurrent_clients_each_get_the_answer_to_their_own_image(host):
    path, _, _ = host
    client = HostClient(path)  # one connection and one region per thread
    images = [image(seed) for seed in range(96)]
    with ThreadPoolExecutor(16) as pool:
        sums = list(pool.map(lambda x: ask(client, x)["sum"][0], images))
    assert sums == [x.astype(np.int64).sum() for x in images]


def test_a_timed_out_call_leaves_its_region_to_the_host_and_the_next_call_uses_a_new_one(host):
    path, _, slow = host
    client = HostClient(path)
    first, second = image(1), image(2)
    with pytest.raises(DeadlineExceeded):
        ask(client, first, op="slow", timeout=0.1)
    # the next call goes out while the host is still reading the abandoned one's region
    assert ask(client, second)["sum"][0] == second.astype(np.int64).sum()
    deadline = time.time() + 5
    while not slow and time.time() < deadline:
        time.sleep(0.02)
    assert slow == [first.astype(np.int64).sum()]  # not overwritten by the second image


def _raw_frame(header: dict) -> bytes:
    head = json.dumps({**header, "buffers": []}).encode()
    return struct.pack("!I", len(head)) + head


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_message_naming_a_region_never_sent_drops_only_its_connection(host):
    path, _, _ = host
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(path)
    bad.sendall(
        _raw_frame({"op": "infer", "inputs": [{"name": "x", "dtype": "|u1", "shape": [8]}], "shm": [8]})
    )
    assert _closed_by_peer(bad)
    x = image(4)
    assert ask(HostClient(path), x)["sum"][0] == x.astype(np.int64).sum()


def test_buffers_beyond_the_end_of_the_region_drop_only_their_connection(host):
    path, _, _ = host
    fd = os.memfd_create("small")
    os.ftruncate(fd, 4096)
    bad = socket.socket(socket.AF_UNIX)
    bad.connect(path)
    spec = [{"name": "x", "dtype": "|u1", "shape": [1 << 20]}]
    send_message(bad, {"op": "infer", "inputs": spec, "shm": [1 << 20]}, fds=[fd])
    os.close(fd)
    assert _closed_by_peer(bad)
    x = image(5)
    assert ask(HostClient(path), x)["sum"][0] == x.astype(np.int64).sum()


@pytest.mark.parametrize("shm_min_bytes", [SHM_MIN_BYTES, None], ids=["shm", "socket"])
def test_joined_parts_arrive_as_one_buffer_in_order(host, shm_min_bytes):
    # a gathered call (serving.http.gather): several requests' rows sent as one tensor, the
    # parts placed end to end in the region or sent one after another on the socket
    path, seen, _ = host
    client = HostClient(path, shm_min_bytes=shm_min_bytes)
    parts = [image(seed, (n, 3, 32, 32)) for seed, n in ((1, 30), (2, 1), (3, 50))]  # 250 KiB in all
    whole = np.concatenate(parts)
    spec = {"name": "x", "dtype": whole.dtype.str, "shape": list(whole.shape)}
    header, out = client.call({"op": "infer", "inputs": [spec]}, [Joined(parts)], time.time() + 5)
    got = decode_tensors(header["outputs"], out)
    assert got["sum"][0] == whole.astype(np.int64).sum()
    np.testing.assert_array_equal(got["first"], whole.reshape(-1)[:8])
    assert seen == ["shm" if shm_min_bytes else "socket"]


@pytest.fixture
def observed_host(tmp_path):
    """A host that tells ``on_region`` of each mapped region and records when each is released;
    a ``slow`` call is answered (by a Pending) only when the test sets ``finish``."""
    events: list[tuple[str, int]] = []
    mapped: list = []
    finish = threading.Event()

    def on_region(region):
        number = len(mapped)
        mapped.append(region)
        events.append(("mapped", number))
        return lambda: events.append(("released", number))

    def dispatch(header, buffers):
        x = decode_tensors(header["inputs"], buffers)["x"]
        total = int(x.astype(np.int64).sum())
        if header["op"] == "slow":
            future = Future()
            threading.Thread(target=lambda: (finish.wait(10), future.set_result(total)), daemon=True).start()
            return Pending(
                future, lambda t: ({"outputs": encode_tensors({"sum": np.array([t])})[0]}, [np.array([t])])
            )
        specs, out = encode_tensors({"sum": np.array([total])})
        return {"outputs": specs}, out

    path = str(tmp_path / "host.sock")
    server = IPCServer(path, dispatch, on_region=on_region)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield path, events, mapped, finish
    server.close()


def _eventually(predicate, timeout: float = 5.0) -> bool:
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline:
        time.sleep(0.01)
    return predicate()


def test_the_host_is_told_of_each_region_and_of_the_end_of_its_use(observed_host):
    path, events, mapped, _ = observed_host
    client = HostClient(path)
    for shape in (BIG, BIG, (8, 3, 224, 224)):  # the second call reuses the region, the third outgrows it
        x = image(len(shape), shape)
        assert ask(client, x)["sum"][0] == x.astype(np.int64).sum()
    assert events == [("mapped", 0), ("released", 0), ("mapped", 1)]
    assert isinstance(mapped[0], mmap.mmap) and len(mapped[1]) > len(mapped[0])
    client.close()  # the connection goes: its region with it
    assert _eventually(lambda: ("released", 1) in events)
    small = image(0, (1, 4))  # through the socket: no region at all
    assert ask(HostClient(path), small)["sum"][0] == small.astype(np.int64).sum()
    assert len(mapped) == 2


def test_a_new_link_gets_a_region_as_large_as_the_largest_message_its_client_sent(observed_host):
    # a CUDA host registers each region: links that each grew their own, one power of two at a
    # time, kept it registering and retiring regions long into serving
    path, events, mapped, _ = observed_host
    client = HostClient(path)
    large = image(1, (12, 3, 224, 224))  # 1.7 MiB: a 2 MiB region
    assert ask(client, large)["sum"][0] == large.astype(np.int64).sum()
    small = image(2)  # 196 KiB, on a second thread's (a second) link
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(ask, client, small).result()["sum"][0] == small.astype(np.int64).sum()
    assert [e for e in events if e[0] == "mapped"] == [("mapped", 0), ("mapped", 1)]
    assert len(mapped[0]) == len(mapped[1]) == 2 << 20
    fresh = HostClient(path)  # another client's links start small
    assert ask(fresh, small)["sum"][0] == small.astype(np.int64).sum()
    assert len(mapped[2]) == 1 << 20


def test_a_region_is_released_only_after_the_reply_its_connection_still_owes(observed_host):
    path, events, _, finish = observed_host
    client = HostClient(path)
    x = image(4)
    with pytest.raises(DeadlineExceeded):  # the client gives up and drops its connection
        ask(client, x, op="slow", timeout=0.2)
    time.sleep(0.2)
    assert events == [("mapped", 0)]  # the host is still working on a call that reads it
    finish.set()
    assert _eventually(lambda: events == [("mapped", 0), ("released", 0)])


def test_a_failing_region_hook_leaves_the_call_to_be_answered(tmp_path):
    def on_region(region):
        raise RuntimeError("driver refused")

    def dispatch(header, buffers):
        x = decode_tensors(header["inputs"], buffers)["x"]
        specs, out = encode_tensors({"sum": np.array([x.astype(np.int64).sum()])})
        return {"outputs": specs}, out

    path = str(tmp_path / "host.sock")
    server = IPCServer(path, dispatch, on_region=on_region)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        x = image(5)
        assert ask(HostClient(path), x)["sum"][0] == x.astype(np.int64).sum()
    finally:
        server.close()
