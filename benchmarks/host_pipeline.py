"""How many image-sized requests one model host process can take in per second, without a GPU.

A real model host (`Host` dispatch, registry, batcher, IPC server) serves a stand-in for a GPU
model: it copies the batch once (the pinned staging copy) and then sleeps for the time an H100
takes for ResNet-50 at that batch (1 ms + 0.07 ms per image, which gives ~10 ms at 128; the
sleep releases the GIL as a CUDA synchronisation does). Client processes send one
1x3x224x224 uint8 image per call over the real IPC, closed loop. It prints the rows/s the host
delivered, the mean batch it formed, and the host's CPU per request — the number that caps a
served GPU model when one host process feeds the device (benchmarks/RESULTS.md).

    .venv/bin/python benchmarks/host_pipeline.py [--concurrency 64,128] [--hosts 1,2] [--pipeline off,on]

With several hosts (``ONEBOX_HOSTS_PER_DEVICE``) each host sleeps independently, as separate
processes sharing one GPU would queue their kernels on it; the stand-in does not model that
sharing, so rows/s with more hosts is the intake side only (the device must be measured too).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGE = (1, 3, 224, 224)
FIXED_MS, PER_IMAGE_MS = 1.0, 0.07


class DeviceLikeModel:
    """A handler stand-in: one staging copy, then device time without the GIL."""

    raw = False

    def __init__(self, depth: int = 1, device=None, scale: float = 1.0):
        from serving.types import BatchMode, Signature, TensorSpec

        self.signature = Signature((TensorSpec("x", "uint8", (-1, *IMAGE[1:])),), (), BatchMode.DYNAMIC)
        # one set of staging buffers per batch that may be launched at once, taken in turn
        self.sets: list[dict[tuple, np.ndarray]] = [{} for _ in range(depth)]
        self.launches = 0
        self.free_at = 0.0  # when the device has run what was launched (one batch at a time)
        # (free_at, busy seconds) shared with other hosts' stand-ins: one device, time-sliced
        self.device = device
        self.scale = scale

    def predict(self, inputs):
        return self.launch(inputs)()

    def input_buffer(self, name, shape, dtype):
        """As a CUDA runner's staging: one buffer per shape that batches are assembled in."""
        key = (name, shape, dtype.str)
        staging = self.sets[self.launches % len(self.sets)]
        buffer = staging.get(key)
        if buffer is None:  # not setdefault: that would allocate a new array on every call
            buffer = staging[key] = np.empty(shape, dtype)
        return buffer

    def launch(self, inputs):
        """As a CUDA runner launches: the staging copy now (unless assembled there), device time
        from when the device is done with what was launched before."""
        x = inputs["x"]
        buffer = self.input_buffer("x", x.shape, x.dtype)
        if not np.shares_memory(buffer, x):
            np.copyto(buffer, x)
        self.launches += 1
        seconds = self.scale * (FIXED_MS + PER_IMAGE_MS * len(x)) / 1000
        if self.device is None:
            done = self.free_at = max(time.perf_counter(), self.free_at) + seconds
        else:  # one device for every host process (perf_counter is the system's monotonic clock)
            free_at, busy = self.device
            with free_at.get_lock():
                done = free_at.value = max(time.perf_counter(), free_at.value) + seconds
                busy.value += seconds

        def collect():
            time.sleep(max(0.0, done - time.perf_counter()))
            return {"output": np.zeros((len(x), 1000), np.float32)}

        return collect


def host_main(path: str, ready, report, measure_s: float, pipelined: bool = False, depth: int = 1,
              device=None, scale: float = 1.0) -> None:  # fmt: skip
    from serving.batching import Batcher, BatchPolicy
    from serving.host.process import Host
    from serving.host.registry import Model, State
    from serving.ipc.server import IPCServer
    from serving.settings import Settings
    from serving.types import Device, ModelConfig

    sys.setswitchinterval(0.0005)  # as run_host does
    host = Host(Settings.from_env({}), Device("cpu"))
    model = DeviceLikeModel(depth, device, scale)
    sizes: list[int] = []
    entry = Model(
        "model", Path("/"), state=State.READY, handler=model, config=ModelConfig(max_batch_size=128)
    )
    entry.batcher = Batcher(model.predict, BatchPolicy(max_batch_size=128, max_queue=4096),
                            launch=model.launch if pipelined else None, allocate=model.input_buffer,
                            observe=lambda stats: sizes.append(stats.rows), depth=depth)  # fmt: skip
    host.registry._models["model"] = entry
    server = IPCServer(path, host.dispatch, host.dispatch_nowait)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ready.set()
    time.sleep(1.0)  # let the clients reach a steady state
    before, batches0, rows0 = resource.getrusage(resource.RUSAGE_SELF), len(sizes), sum(sizes)
    time.sleep(measure_s)
    after, batches1, rows1 = resource.getrusage(resource.RUSAGE_SELF), len(sizes), sum(sizes)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    rows = rows1 - rows0
    report.put((rows / measure_s, rows / max(batches1 - batches0, 1), cpu / measure_s, cpu / max(rows, 1)))
    time.sleep(3600)


def client_main(paths: list[str], threads: int, seconds: float) -> None:
    from serving.ipc.client import HostClient

    clients = [HostClient(path) for path in paths]
    image = np.random.default_rng(0).integers(0, 255, IMAGE, dtype=np.uint8)
    stop = time.time() + seconds

    def loop(client):
        while time.time() < stop:
            client.infer("model", {"x": image}, time.time() + 30)

    # threads spread evenly over the hosts, as the frontends' least-outstanding routing does
    workers = [threading.Thread(target=loop, args=(clients[i % len(clients)],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def run(concurrency: int, processes: int, duration: float, hosts: int, pipelined: bool = False,
        depth: int = 1) -> tuple:  # fmt: skip
    """Totals over ``hosts`` host processes: rows/s, mean batch, host cores, host CPU per request."""
    paths = [tempfile.mktemp(prefix="onebox-host-", suffix=".sock") for _ in range(hosts)]
    report = multiprocessing.Queue()
    procs = []
    for path in paths:
        ready = multiprocessing.Event()
        procs.append(
            multiprocessing.Process(
                target=host_main, args=(path, ready, report, duration - 2, pipelined, depth), daemon=True
            )
        )
        procs[-1].start()
        ready.wait(30)
    clients = [multiprocessing.Process(target=client_main, args=(paths, concurrency // processes, duration))
               for _ in range(processes)]  # fmt: skip
    for client in clients:
        client.start()
    results = [report.get(timeout=duration + 30) for _ in paths]
    for client in clients:
        client.join()
    for proc in procs:
        proc.terminate()
    rows = sum(r[0] for r in results)
    batch = sum(r[1] for r in results) / hosts
    cores = sum(r[2] for r in results)
    return rows, batch, cores, cores / rows if rows else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="64,128")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--hosts", default="1,2", help="host processes feeding the one device stand-in")
    parser.add_argument(
        "--pipeline",
        default="on",
        help="off, on (answer a batch while the next runs) or ahead (also launch the next behind "
        "the running one: pipeline_depth 2), e.g. off,on,ahead",
    )
    args = parser.parse_args(argv)
    print(f"device stand-in: {FIXED_MS} ms + {PER_IMAGE_MS} ms per image (ceiling at batch 128: "
          f"{128 / (FIXED_MS + PER_IMAGE_MS * 128) * 1000:.0f} img/s)")  # fmt: skip
    print("pipeline hosts conc | rows/s  mean batch | host cores  host CPU per request")
    for hosts in (int(h) for h in args.hosts.split(",")):
        for conc in (int(c) for c in args.concurrency.split(",")):
            for pipeline in args.pipeline.split(","):
                rows_s, batch, cores, per_request = run(
                    conc,
                    args.processes,
                    args.duration,
                    hosts,
                    pipeline != "off",
                    2 if pipeline == "ahead" else 1,
                )
                print(
                    f"{pipeline:>8} {hosts:5d} {conc:4d} | {rows_s:6.0f}  {batch:10.1f} | {cores:10.2f}"
                    f"  {per_request * 1e6:8.0f} us"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
