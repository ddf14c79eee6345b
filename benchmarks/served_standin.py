"""Served images/s and the device's busy share against a device stand-in that every host shares.

What the frontends' gathering (``ONEBOX_FRONTEND_GATHER``, ``ONEBOX_FRONTEND_MAX_CALLS``), the
number of model hosts and the pipeline depth do to a device's busy time, without a GPU. Model
hosts run host_pipeline.py's stand-in (a staging copy, then device time without the GIL) on ONE
device timeline shared across processes: a batch starts when the device has finished every
batch launched before it by any host, as processes time-slicing a GPU do (without the cost of
the switch). Real ``loop`` frontends (``python -m serving frontend``) gather requests for them,
and the load generator sends one 1x3x224x224 uint8 image per request over HTTP, closed loop.
Device time is the stand-in's H100 ResNet-50 time times ``--scale``, so that a machine's CPUs
can feed it: compare the busy share and the batches between configurations of one run.

    .venv/bin/python benchmarks/served_standin.py [--hosts 1,3] [--gather off,2,0] [--pipeline on,ahead]
"""

from __future__ import annotations

import argparse
import io
import itertools
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import free_port, machine
from benchmarks.host_pipeline import FIXED_MS, IMAGE, PER_IMAGE_MS, host_main
from serving.bench.loadgen import run_load
from serving.ipc.directory import write_hosts_file

REPO = Path(__file__).resolve().parents[1]


def run(hosts: int, gather: str, pipeline: str, args) -> dict:
    """One configuration: images/s, p50, device busy share, mean batch, host cores."""
    run_dir = Path(tempfile.mkdtemp(prefix="onebox-standin-"))
    free_at, busy = multiprocessing.Value("d", 0.0), multiprocessing.Value("d", 0.0)
    report = multiprocessing.Queue()
    measure_s = args.duration - 1.0
    procs, entries = [], []
    for i in range(hosts):
        path = str(run_dir / f"host-{i}.sock")
        ready = multiprocessing.Event()
        depth = 2 if pipeline == "ahead" else 1
        procs.append(multiprocessing.Process(
            target=host_main,
            args=(path, ready, report, measure_s, pipeline != "off", depth, (free_at, busy), args.scale),
            daemon=True,
        ))  # fmt: skip
        procs[-1].start()
        ready.wait(30)
        entries.append({"name": f"host-{i}", "device": "cpu", "socket": path})
    write_hosts_file(run_dir, entries)
    port = free_port()
    env = {
        **os.environ,
        "SAGEMAKER_BIND_TO_PORT": str(port),
        "SAGEMAKER_MODEL_SERVER_WORKERS": str(args.workers),
        "ONEBOX_BIND_HOST": "127.0.0.1",
        "ONEBOX_FRONTEND_GATHER": "false" if gather == "off" else "true",
        "ONEBOX_FRONTEND_MAX_CALLS": "0" if gather == "off" else gather,
    }
    frontend = subprocess.Popen(
        [sys.executable, "-m", "serving", "frontend", "--run-dir", str(run_dir)],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        buf = io.BytesIO()
        np.save(buf, np.random.default_rng(0).integers(0, 255, IMAGE, dtype=np.uint8))
        headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
        url = f"http://127.0.0.1:{port}/invocations"
        _wait_ready(port)
        busy0, start = busy.value, time.perf_counter()
        result = run_load(url, body=buf.getvalue(), headers=headers, concurrency=args.concurrency,
                          duration_s=args.duration, warmup_s=1.0, processes=args.processes)  # fmt: skip
        busy_share = (busy.value - busy0) / (time.perf_counter() - start)
        stats = [report.get(timeout=60) for _ in procs]  # rows/s, mean batch, cores, CPU per row
    finally:
        frontend.terminate()
        frontend.wait(30)
        for proc in procs:
            proc.terminate()
    if result.error_count:
        raise RuntimeError(f"errors: {result}")
    return {
        "img_s": result.rps,
        "p50_ms": result.p50_ms,
        "busy": min(busy_share, 1.0),
        "batch": sum(s[1] for s in stats) / len(stats),
        "host_cores": sum(s[2] for s in stats),
    }


def _wait_ready(port: int, timeout: float = 30.0) -> None:
    """Until ``/ping`` answers 200 (gunicorn has forked the frontends, the hosts answer)."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError("the stand-in server did not become ready")
        time.sleep(0.2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1,3")
    parser.add_argument("--gather", default="off,2,0", help="off, or ONEBOX_FRONTEND_MAX_CALLS values")
    parser.add_argument("--pipeline", default="on,ahead", help="off, on, ahead (pipeline_depth 2)")
    parser.add_argument("--scale", type=float, default=8.0, help="device time x the H100 stand-in's")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="frontend processes")
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--duration", type=float, default=6.0)
    args = parser.parse_args(argv)
    per_batch = args.scale * (FIXED_MS + PER_IMAGE_MS * 128)
    print(machine())
    print(f"device stand-in x{args.scale:g}: {args.scale * FIXED_MS:.1f} ms + {args.scale * PER_IMAGE_MS:.2f} ms "
          f"per image, ceiling {128 / per_batch * 1000:.0f} img/s at batch 128; concurrency {args.concurrency}")  # fmt: skip
    print("hosts  gather  pipeline | img/s   p50 ms | device busy  mean batch  host cores")
    for hosts, gather, pipeline in itertools.product(
        args.hosts.split(","), args.gather.split(","), args.pipeline.split(",")
    ):
        r = run(int(hosts), gather, pipeline, args)
        print(f"{hosts:>5}  {gather:>6}  {pipeline:>8} | {r['img_s']:5.0f}  {r['p50_ms']:7.1f} | "
              f"{r['busy']:10.0%}  {r['batch']:10.1f}  {r['host_cores']:10.2f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
