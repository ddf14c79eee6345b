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
``--regions N``: the rows lie in N such registered regions of ``--region-mib`` each, the parts
spread across them, as a serving host holds one region per frontend link (~150 at concurrency
256). ``--busy-procs K``: K processes spin on the CPU beside it, as the frontends do.
``cat`` (where the device can read registered host memory at its host address): no copy call
at all; one ``torch.cat`` of the parts as CUDA views of the registered memory, read by the
device's own threads over the bus (zero-copy), 8 bytes a load where every part is aligned. The
last table gives each way's device time for the batch with the device otherwise idle.
``gather kernel``: the same reads by the kernel of ``benchmarks/gather_kernel.py``, one launch for
all the parts through ``ctypes.PyDLL`` (GIL held).

Usage: ``python3 benchmarks/gpu_copy_calls.py [--parts 18] [--rows 5] [--switch-ms 0.5] [--memfd]
[--regions 1] [--busy-procs 0] [--map]``
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
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


def _region(size: int, memfd: bool, keep: list) -> tuple[np.ndarray, np.ndarray]:
    """``size`` bytes of page-aligned host memory, and a writable view of the same bytes: an
    anonymous mapping (the view is itself), or a memfd mapped read-only as a host maps a
    frontend's region (the view through a second, writable mapping, as the frontend writes).
    ``keep`` holds the mappings."""
    if not memfd:
        mapping = mmap.mmap(-1, size)
        keep.append(mapping)
        region = np.frombuffer(mapping, np.uint8)
        return region, region
    fd = os.memfd_create("copy-calls")
    os.ftruncate(fd, size)
    writer = mmap.mmap(fd, size)
    reader = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    os.close(fd)
    keep += [reader, writer]
    return np.frombuffer(reader, np.uint8), np.frombuffer(writer, np.uint8)


def rows_in_regions(
    host: np.ndarray, parts: int, count: int, size: int, memfd: bool, keep: list, register: Callable
) -> list[np.ndarray]:
    """``host``'s rows as ``parts`` equal parts, each lying in one of ``count`` regions of
    ``size`` bytes (``register``-ed as they are made), the parts spread evenly over them."""
    rows = len(host) // parts
    width = host[:rows].nbytes
    spans = np.array_split(np.arange(parts), count)  # the parts each region holds
    if max(len(span) for span in spans) * width > size:
        raise SystemExit(
            f"regions of {size >> 10} KiB are too small for {len(spans[0])} parts of {width >> 10} KiB"
        )
    views = [None] * parts
    for span in spans:
        region, fill = _region(size, memfd, keep)
        register(region)
        for k, index in enumerate(span):
            fill[k * width : (k + 1) * width] = host[index * rows : (index + 1) * rows].reshape(-1)
            views[index] = region[k * width : (k + 1) * width].reshape(rows, *host.shape[1:])
    return views


class _CudaView:
    """Registered host memory as a CUDA array (``__cuda_array_interface__``) at its host
    address: what the device reads where it can use host pointers of registered memory."""

    def __init__(self, address: int, nbytes: int, itemsize: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes // itemsize,),
            "typestr": f"<u{itemsize}" if itemsize > 1 else "|u1",
            "data": (address, False),
            "version": 3,
        }


def _mapped_views(parts: list[np.ndarray], nbytes: int, torch) -> list | None:
    """The parts as CUDA tensors over their registered host memory (8-byte items where every
    part and length allows), or None where the device cannot use host pointers."""
    import ctypes

    value = ctypes.c_int()
    # CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM, device 0
    if ctypes.CDLL("libcuda.so.1").cuDeviceGetAttribute(ctypes.byref(value), 91, 0) != 0 or not value.value:
        return None
    itemsize = 8 if all(part.ctypes.data % 8 == 0 for part in parts) and nbytes % 8 == 0 else 1
    return [
        torch.as_tensor(_CudaView(part.ctypes.data, part.nbytes, itemsize), device="cuda") for part in parts
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=18, help="copies queued per batch")
    parser.add_argument("--rows", type=int, default=5, help="rows (150 KB images) per copy")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--switch-ms", type=float, default=0.5,
                        help="the interpreter's switch interval; 0.5 as a model host sets it (Python's own: 5)")  # fmt: skip
    parser.add_argument("--memfd", action="store_true", help="rows in read-only memfd mappings")
    parser.add_argument("--regions", type=int, default=1, help="registered regions the rows are spread over")
    parser.add_argument("--region-mib", type=int, default=2, help="each region's size with --regions > 1")
    parser.add_argument("--busy-procs", type=int, default=0, help="processes spinning on the CPU beside it")
    parser.add_argument("--map", action="store_true", help="register with cudaHostRegisterMapped too (0x02)")
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
    host = np.ascontiguousarray(values)  # what the target must hold after each batch
    count = max(1, args.regions)
    size = host.nbytes if count == 1 else args.region_mib << 20

    def register(region: np.ndarray) -> None:
        flags = REGISTER_FLAGS | (0x02 if args.map else 0)
        assert int(cudart.cudaHostRegister(region.ctypes.data, region.nbytes, flags)) == 0

    keep: list = []  # the mappings, alive while their views are
    parts = rows_in_regions(host, args.parts, count, size, args.memfd, keep, register)
    print(
        f"{count} registered region(s) of {size >> 10} KiB, {'memfd read-only' if args.memfd else 'anonymous'}"
    )
    # the pure-Python loop of the spinning thread, in processes spawned (not forked: this
    # process has CUDA and threads) until the end
    spawn = multiprocessing.get_context("spawn")
    halt = spawn.Event()
    procs = [spawn.Process(target=_spin, args=(halt,), daemon=True) for _ in range(args.busy_procs)]
    for proc in procs:
        proc.start()
    if procs:
        print(f"{len(procs)} processes spinning beside it on {os.cpu_count()} CPUs")
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
    from benchmarks.gather_kernel import GatherKernel

    kernel = GatherKernel(0)
    why = kernel.load()
    if why is None:
        width = host[0].nbytes
        segments, at = [], 0
        for part in parts:
            segments.append((target.data_ptr() + at * width, part.ctypes.data, part.nbytes))
            at += len(part)

        def with_kernel() -> None:
            handle = torch.cuda.current_stream(device).cuda_stream
            assert kernel.launch(segments, handle) == 0

        ways["gather kernel (PyDLL)"] = with_kernel
    else:
        print(f"gather kernel: NOT available ({why})")
    mapped = _mapped_views(parts, host[0].nbytes * args.rows, torch)
    if mapped is not None:
        flat = target.view(-1).view(mapped[0].dtype)

        def with_cat() -> None:
            torch.cat(mapped, out=flat)

        ways["cat (zero-copy)"] = with_cat
    else:
        print("zero-copy cat: NOT available (host pointers not usable on the device)")
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
    cells = []
    with torch.cuda.stream(stream):
        for name, way in ways.items():
            times = []
            for _ in range(args.repeats):
                target.zero_()
                stream.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
                way()
                end.record(stream)
                end.synchronize()
                times.append(start.elapsed_time(end) * 1000)
            assert torch.equal(target.cpu(), torch.from_numpy(host)), name
            times.sort()
            gbs = host.nbytes / (statistics.median(times) * 1e-6) / 1e9
            cells.append(
                f"{statistics.median(times):>7.0f} ({times[int(len(times) * 0.9)]:>5.0f}) {gbs:4.1f} GB/s"
            )
    print(f"{'device us':<12}" + "".join(f"{c:>24}" for c in cells))
    halt.set()
    for proc in procs:
        proc.join(timeout=2)


if __name__ == "__main__":
    main()
