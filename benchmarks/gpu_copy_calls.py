"""What queuing a batch's host-to-device copies costs the launching thread, on a CUDA GPU.

A CUDA host queues one copy per call of rows (``handlers/cuda_inputs.py``), ~18 for a batch of
~100 images, from the frontends' registered shared regions into a graph's static input. Each
``Tensor.copy_`` releases the GIL and takes it back, and beside the launching thread the host's
I/O and answer threads want it too. This script times queuing N such copies (one 150 KB image
each, from registered memory) with ``torch`` (``Tensor.copy_``) and with the copy call of
``handlers/cuda_driver.py`` (the driver's ``cuMemcpyHtoDAsync`` through ``ctypes.PyDLL``, which
keeps the GIL), while 0, 1 or 2 other Python threads run: ``spin`` (pure Python, as the answer
thread converting outputs) and ``io`` (a socket ping-pong, as the I/O thread); and while the
device computes (``gpu``: 8 large matrix products queued on another stream just before), with
another thread asleep in a blocking-sync event wait for that compute (``gpu+wait``, as the
batcher waits for the batch on the device while copies for the next are queued beside it).
``--memfd``: the rows lie in a memfd mapped read-only, as a host maps a frontend's region.

Usage: ``python3 benchmarks/gpu_copy_calls.py [--parts 18] [--rows 5] [--switch-ms 0.5] [--memfd]``
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _spin(stop: threading.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i


def _io(stop: threading.Event) -> None:
    a, b = socket.socketpair()
    echo = threading.Thread(target=_echo, args=(b, stop), daemon=True)
    echo.start()
    while not stop.is_set():
        a.sendall(b"x" * 64)
        a.recv(64)
    a.close()


def _echo(sock: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        data = sock.recv(64)
        if not data:
            return
        sock.sendall(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=18, help="copies queued per batch")
    parser.add_argument("--rows", type=int, default=5, help="rows (150 KB images) per copy")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--switch-ms", type=float, default=0.5,
                        help="the interpreter's switch interval; 0.5 as a model host sets it (Python's own: 5)")  # fmt: skip
    parser.add_argument("--memfd", action="store_true", help="rows in a read-only memfd mapping")
    args = parser.parse_args()
    sys.setswitchinterval(args.switch_ms / 1000)

    import torch

    from handlers import cuda_driver
    from handlers.host_memory import REGISTER_FLAGS

    if not torch.cuda.is_available():
        sys.exit("gpu_copy_calls.py needs a CUDA GPU")
    device = torch.device("cuda", 0)
    row = (3, 224, 224)
    rows = args.parts * args.rows
    torch.zeros(1, device=device)
    cudart = torch.cuda.cudart()
    values = np.broadcast_to(np.arange(rows, dtype=np.uint8)[:, None, None, None], (rows, *row))
    if args.memfd:  # as a host maps a frontend's region: read-only
        import mmap
        import os

        fd = os.memfd_create("copy-calls")
        os.ftruncate(fd, values.nbytes)
        with mmap.mmap(fd, values.nbytes) as writer:
            writer[:] = values.tobytes()
        mapping = mmap.mmap(fd, values.nbytes, prot=mmap.PROT_READ)
        os.close(fd)
        host = np.frombuffer(mapping, np.uint8).reshape(rows, *row)
    else:
        host = np.ascontiguousarray(values)
    assert int(cudart.cudaHostRegister(host.ctypes.data, host.nbytes, REGISTER_FLAGS)) == 0
    parts = [host[i : i + args.rows] for i in range(0, rows, args.rows)]
    target = torch.empty((rows, *row), dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    copier = cuda_driver.CudaDriver.load()
    print(f"driver copy: {'available' if copier else 'NOT available'}; {torch.cuda.get_device_name(0)}")

    def with_torch() -> None:
        at = 0
        for part in parts:
            target[at : at + len(part)].copy_(torch.from_numpy(part), non_blocking=True)
            at += len(part)

    def with_driver() -> None:
        handle = torch.cuda.current_stream(device).cuda_stream
        base, width = target.data_ptr(), host[0].nbytes
        at = 0
        for part in parts:
            assert copier.host_to_device(base + at * width, part.ctypes.data, part.nbytes, handle)
            at += len(part)

    ways = {"torch copy_": with_torch}
    if copier:
        ways["driver (PyDLL)"] = with_driver
    print(f"{args.parts} copies of {args.rows} rows ({host[0].nbytes * args.rows // 1024} KB each) per batch, "
          f"CPU microseconds to queue them, median (p90) of {args.repeats}, switch interval {args.switch_ms} ms")  # fmt: skip
    print(f"{'others':<12}" + "".join(f"{name:>24}" for name in ways))
    busy = torch.cuda.Stream(device)
    square = torch.randn(4096, 4096, device=device)
    waits: list = []  # events the waiter thread sleeps on (gpu+wait)

    def occupy(wait: bool) -> None:
        """8 products of 4096x4096 float32 matrices (~1.1 TFLOP) queued on another stream; with
        ``wait``, the waiter thread asleep until they end."""
        with torch.cuda.stream(busy):
            for _ in range(8):
                torch.mm(square, square)
            done = torch.cuda.Event(blocking=True)
            done.record(busy)
        if wait:
            waits.append(done)
            time.sleep(0.001)  # the waiter is inside the wait

    def _waiter(stop: threading.Event) -> None:
        while not stop.is_set():
            if waits:
                waits.pop().synchronize()
            else:
                time.sleep(0.0001)

    for others in ("none", "spin", "spin+io", "io", "gpu", "gpu+wait"):
        stop = threading.Event()
        threads = [threading.Thread(target={"spin": _spin, "io": _io, "wait": _waiter}[k], args=(stop,), daemon=True)
                   for k in others.split("+") if k not in ("none", "gpu")]  # fmt: skip
        for t in threads:
            t.start()
        cells = []
        with torch.cuda.stream(stream):
            for name, way in ways.items():
                times = []
                for _ in range(args.repeats):
                    target.zero_()
                    stream.synchronize()
                    if others.startswith("gpu"):
                        occupy(wait="wait" in others)
                    start = time.perf_counter()
                    way()
                    times.append((time.perf_counter() - start) * 1e6)
                    torch.cuda.synchronize(device)
                assert torch.equal(target.cpu(), torch.from_numpy(host)), name
                times.sort()
                cells.append(f"{statistics.median(times):>12.0f} ({times[int(len(times) * 0.9)]:>6.0f})")
        stop.set()
        for t in threads:
            t.join(timeout=2)
        print(f"{others:<12}" + "".join(f"{c:>24}" for c in cells))


if __name__ == "__main__":
    main()
