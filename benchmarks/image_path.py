"""CPU each part of the server spends per image-sized request, with a model that costs nothing.

`onebox serve` runs a TorchScript model that takes ``Nx3x224x224`` uint8 and answers ``Nx1000``
float32 almost for free, so every CPU second measured is the server's: HTTP, decoding, IPC,
batching, replies. The load generator sends one image per request as ``application/x-npy``
(150 KB, as `gpu_resnet50.py` does). It prints, per concurrency, requests/s and the CPU
microseconds per request used by the model host, the frontends and the load generator — the
budget that decides how many images/s a machine's cores can serve before the device is the
limit (benchmarks/RESULTS.md, GPU section).

    .venv/bin/python benchmarks/image_path.py [--concurrency 16,64] [--workers 2] [--threads 16]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Service, batch_totals, machine, server_roles
from serving.bench.loadgen import run_load

IMAGE = (1, 3, 224, 224)


def build_model(directory: Path) -> Path:
    """A TorchScript model whose answer depends on the image but costs next to nothing."""
    import torch

    class Cheap(torch.nn.Module):
        def forward(self, x):
            return x[:, 0, 0, :1].float().repeat(1, 1000)

    torch.jit.script(Cheap()).save(str(directory / "model.pt"))
    # the input declared as uint8, as gpu_resnet50.py does: undeclared, TorchScript inputs are
    # float32 and the frontend would cast every image to 600 KB
    (directory / "onebox.toml").write_text(
        'max_batch_size = 128\nmax_delay_ms = 0\n\n[[inputs]]\nname = "x"\ndtype = "uint8"\nshape = [-1, 3, 224, 224]\n'
    )
    return directory


class RoleCpu:
    """CPU seconds used so far by the server's host and frontend processes."""

    def __init__(self, server_pid: int):
        self.roles = server_roles(server_pid)

    def snapshot(self) -> dict[str, float]:
        return {role: sum(sum(p.cpu_times()[:2]) for p in procs) for role, procs in self.roles.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--workers", type=int, default=2, help="frontend processes")
    parser.add_argument("--threads", type=int, default=16, help="threads per frontend")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    args = parser.parse_args(argv)

    image = np.random.default_rng(0).integers(0, 255, IMAGE, dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, image)
    body = buf.getvalue()
    headers = {"Content-Type": "application/x-npy", "Accept": "application/x-npy"}
    want = float(image[0, 0, 0, 0])

    def verify(status: int, payload: bytes):
        if status != 200:
            return f"status {status}: {payload[:200]!r}"
        out = np.load(io.BytesIO(payload))
        return None if out.shape == (1, 1000) and out[0, 0] == want else f"wrong answer {out.shape}"

    print(f"{machine()}; {args.workers} frontends x {args.threads} threads, body {len(body)} B")
    print("  conc |  req/s  p50 ms | CPU us per request: host  frontends  loadgen  total | rows/call  batch")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp))
        run_dir = Path(tmp) / "run"
        env = {"SAGEMAKER_MODEL_SERVER_WORKERS": str(args.workers),
               "ONEBOX_FRONTEND_THREADS": str(args.threads), "ONEBOX_RUN_DIR": str(run_dir)}  # fmt: skip
        with Service(["-m", "serving", "serve", str(model_dir)], env) as server:
            cpu = RoleCpu(server.proc.pid)
            for conc in (int(c) for c in args.concurrency.split(",")):
                marks = {}

                def mark(key, marks=marks):
                    marks[key] = cpu.snapshot()

                # the role CPU is read over the measured window only (warm-up excluded)
                timers = [threading.Timer(1.0, mark, ("start",)),
                          threading.Timer(1.0 + args.duration, mark, ("end",))]  # fmt: skip
                before = batch_totals(run_dir)
                for timer in timers:
                    timer.start()
                result = run_load(server.url, body=body, headers=headers, concurrency=conc,
                                  duration_s=args.duration, warmup_s=1.0, processes=args.processes,
                                  verify=verify, verify_every=50)  # fmt: skip
                for timer in timers:
                    timer.join()
                ran = batch_totals(run_dir)
                ran.subtract(before)
                per_call = ran["rows"] / (ran["requests"] or 1)
                per_batch = ran["rows"] / (ran["batches"] or 1)
                if result.error_count or result.verify_failures:
                    raise RuntimeError(f"bad answers: {result}")
                n = max(result.requests, 1)
                host = (marks["end"]["host"] - marks["start"]["host"]) / n * 1e6
                front = (marks["end"]["frontend"] - marks["start"]["frontend"]) / n * 1e6
                load = result.client_cpu_s / n * 1e6
                print(f"  {conc:4d} | {result.rps:6.0f}  {result.p50_ms:6.2f} | {host:24.0f}  {front:9.0f}"
                      f"  {load:7.0f}  {host + front + load:5.0f} | {per_call:9.1f}  {per_batch:5.1f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
