"""The IPC layer's own cost: frontend -> model host round trips, next to a bare Unix-socket ping-pong.

For each payload size it prints the median round-trip time and calls/s of
  bare     a raw Unix-socket ping-pong between two processes (send N bytes, get N bytes back);
  ipc      `HostClient.infer` -> `IPCServer` -> an echo dispatch in another process (JSON header,
           tensor specs, scatter-gather send, recv_into), the same bytes each way;
and the IPC's overhead over the bare socket in microseconds. One client thread, one server.

    .venv/bin/python benchmarks/ipc.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serving.ipc.client import HostClient
from serving.ipc.protocol import decode_tensors, encode_tensors
from serving.ipc.server import IPCServer

SIZES = [16, 4 * 1024, 150 * 1024, 1536 * 1024, 19 * 1024 * 1024]


def _ipc_server(path: str, ready) -> None:
    def dispatch(header, buffers):
        specs, out = encode_tensors(decode_tensors(header["inputs"], buffers))
        return {"outputs": specs}, out

    server = IPCServer(path, dispatch)
    ready.set()
    server.serve_forever()


def _bare_server(path: str, ready) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    ready.set()
    conn, _ = listener.accept()
    while True:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            return
        size = int.from_bytes(head, "little")
        buf = bytearray(size)
        view, got = memoryview(buf), 0
        while got < size:
            got += conn.recv_into(view[got:])
        conn.sendall(head)
        conn.sendall(buf)


def _start(target, path: str) -> multiprocessing.Process:
    ready = multiprocessing.Event()
    proc = multiprocessing.Process(target=target, args=(path, ready), daemon=True)
    proc.start()
    ready.wait(10)
    return proc


def time_ipc(path: str, size: int, calls: int) -> list[float]:
    client = HostClient(path)
    x = np.frombuffer(os.urandom(size), dtype=np.uint8).reshape(1, size)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        out = client.infer("m", {"x": x}, time.time() + 30)
        times.append(time.perf_counter() - start)
    assert out["x"].nbytes == size
    client.close()
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--calls", type=int, default=2000, help="round trips per size (fewer for the large ones)"
    )
    args = parser.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="onebox-ipc-"))
    ipc_path, bare_path = str(run_dir / "ipc.sock"), str(run_dir / "bare.sock")
    procs = [_start(_ipc_server, ipc_path), _start(_bare_server, bare_path)]
    print(f"machine: {os.cpu_count()} CPUs; one client thread; median of N round trips")
    print(f"{'payload':>10} | {'bare us':>9} {'calls/s':>9} | {'ipc us':>9} {'calls/s':>9} | {'overhead':>9}")
    ipc_us = {}
    for size in SIZES:
        time_ipc(ipc_path, size, 20)  # warm-up
        ipc_us[size] = statistics.median(time_ipc(ipc_path, size, _calls(args.calls, size))) * 1e6
    bare_us = _bare_series(bare_path, args.calls)  # the bare server serves one connection: all sizes on it
    for size in SIZES:
        bare, ipc = bare_us[size], ipc_us[size]
        print(
            f"{_fmt(size):>10} | {bare:9.1f} {1e6 / bare:9.0f} | {ipc:9.1f} {1e6 / ipc:9.0f} | {ipc - bare:+8.1f}us"
        )
    for proc in procs:
        proc.terminate()
    return 0


def _calls(calls: int, size: int) -> int:
    """Fewer round trips for large payloads, so every size takes about as long."""
    return max(20, min(calls, calls * 150 * 1024 // size))


def _bare_series(path: str, calls_default: int) -> dict[int, float]:
    results = {}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    for size in SIZES:
        calls = _calls(calls_default, size)
        payload, back = os.urandom(size), bytearray(size)
        times = []
        for i in range(calls + 20):
            start = time.perf_counter()
            sock.sendall(size.to_bytes(8, "little"))
            sock.sendall(payload)
            sock.recv(8, socket.MSG_WAITALL)
            view, got = memoryview(back), 0
            while got < size:
                got += sock.recv_into(view[got:])
            if i >= 20:
                times.append(time.perf_counter() - start)
        results[size] = statistics.median(times) * 1e6
    sock.close()
    return results


def _fmt(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"


if __name__ == "__main__":
    sys.exit(main())
