"""What dynamic batching buys on CPU: a TorchScript MLP served with batching off and on.

The model is an MLP 256 -> 4096 -> 4096 -> 10 (17.9 M parameters, 72 MB of float32 weights): at
batch 1 a call is bound by streaming the weights, so one call for 32 rows costs a few times one
call for one row, which is where batching pays on a CPU. One run prints requests/s and p50/p99 at
concurrency 1, 8, 32 and 64 with ``max_batch_size = 1`` and with ``max_batch_size = 32,
max_delay_ms = 0``, plus the mean batch size the host formed (from its ``stats`` IPC op). Targets:
at least 3x the requests/s at concurrency 32 with batching on, and a p50 at concurrency 1 no more
than 0.5 ms above batching off.

    .venv/bin/python benchmarks/batching.py [--duration 5] [--repeats 3] [--threads 1] [--hidden 4096]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Service, add_run_options, machine, measure, median_run, spread
from serving.ipc.client import HostClient
from serving.ipc.directory import read_hosts_file

LEVELS = (1, 8, 32, 64)
CONFIGS = {"off": "max_batch_size = 1\n", "on": "max_batch_size = 32\nmax_delay_ms = 0\n"}
SIGNATURE = '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 256]\n'


def build_mlp(path: Path, hidden: int):
    """Script and save the MLP; returns the module for computing expected answers."""
    import torch

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(256, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    ).eval()  # fmt: skip
    scripted = torch.jit.script(mlp)
    torch.jit.save(scripted, str(path))
    return mlp


def model_dirs(root: Path, threads: int, hidden: int) -> tuple[dict[str, Path], bytes, list[float]]:
    """One model directory per batching config (same model file), the request body and its answer."""
    import numpy as np
    import torch

    dirs = {}
    model = None
    for name, knobs in CONFIGS.items():
        model_dir = root / f"mlp-{name}"
        model_dir.mkdir()
        (model_dir / "onebox.toml").write_text(f"threads = {threads}\n{knobs}{SIGNATURE}")
        if model is None:
            model = build_mlp(model_dir / "model.pt", hidden)
            first = model_dir / "model.pt"
        else:
            (model_dir / "model.pt").write_bytes(first.read_bytes())
        dirs[name] = model_dir
    row = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(row[None]))[0].tolist()
    return dirs, json.dumps([row.tolist()]).encode(), expected


def checker(expected: list[float]):
    """A verify function: the answer is the model's 10 outputs for the request row."""

    def verify(status: int, body: bytes) -> str | None:
        values = json.loads(body)
        values = values.get("output", values) if isinstance(values, dict) else values
        got = values[0] if values and isinstance(values[0], list) else values
        if len(got) != 10 or any(
            abs(a - b) > 1e-3 * (1 + abs(b)) for a, b in zip(got, expected, strict=True)
        ):
            return f"wrong answer {body[:120]!r}"
        return None

    return verify


def host_stats(run_dir: Path) -> dict:
    """The model's totals from the host's ``stats`` op."""
    client = HostClient(read_hosts_file(run_dir)[0]["socket"])
    try:
        return client.stats(time.time() + 5)["models"].get("model", {"batches": 0, "rows": 0})
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    """Serve the MLP with batching off and on, at every concurrency, and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (onebox.toml threads)")
    parser.add_argument("--hidden", type=int, default=4096, help="width of the two hidden layers")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"model: TorchScript MLP 256-{args.hidden}-{args.hidden}-10, JSON body of 1 row; torch threads {args.threads}; "
          f"server defaults otherwise; {args.repeats} runs of {args.duration:g}s (+{args.warmup:g}s warm-up), "
          "median shown; the two servers take turns")  # fmt: skip
    results, rows, batches = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        dirs, body, expected = model_dirs(Path(tmp), args.threads, args.hidden)
        verify = checker(expected)
        with contextlib.ExitStack() as stack:
            services = {}
            for name, model_dir in dirs.items():
                env = {
                    "ONEBOX_RUN_DIR": str(Path(tmp) / f"run-{name}"),
                    "SAGEMAKER_CONTAINER_LOG_LEVEL": "WARNING",
                }
                services[name] = stack.enter_context(Service(["-m", "serving", "serve", str(model_dir)], env))
            for level in LEVELS:
                # both servers stay up and take turns, so drift on the machine hits both alike
                for _ in range(args.repeats):
                    for name, service in services.items():
                        before = host_stats(Path(service.env["ONEBOX_RUN_DIR"]))
                        run = measure(service.url, body, level, duration_s=args.duration, warmup_s=args.warmup,
                                      repeats=1, verify=verify)  # fmt: skip
                        after = host_stats(Path(service.env["ONEBOX_RUN_DIR"]))
                        results.setdefault((name, level), []).extend(run)
                        rows[name, level] = rows.get((name, level), 0) + after["rows"] - before["rows"]
                        batches[name, level] = (
                            batches.get((name, level), 0) + after["batches"] - before["batches"]
                        )
    batch_means = {key: rows[key] / batches[key] if batches[key] else 0.0 for key in rows}
    print()
    print(f"{'conc':>4} | {'off req/s':>9} {'p50':>6} {'p99':>7} | {'on req/s':>8} {'p50':>6} {'p99':>7} "
          f"{'batch':>5} | {'speed-up':>8} | on spread, off spread")  # fmt: skip
    for level in LEVELS:
        off, on = median_run(results["off", level]), median_run(results["on", level])
        print(f"{level:>4} | {off.rps:>9.0f} {off.p50_ms:>6.2f} {off.p99_ms:>7.2f} | {on.rps:>8.0f} "
              f"{on.p50_ms:>6.2f} {on.p99_ms:>7.2f} {batch_means['on', level]:>5.1f} | {on.rps / off.rps:>7.2f}x | "
              f"{spread(results['on', level])}, {spread(results['off', level])}")  # fmt: skip
    off32, on32 = median_run(results["off", 32]), median_run(results["on", 32])
    off1, on1 = median_run(results["off", 1]), median_run(results["on", 1])
    print(f"target: >= 3x req/s at concurrency 32: {'met' if on32.rps >= 3 * off32.rps else 'MISSED'} "
          f"({on32.rps / off32.rps:.2f}x); p50 at concurrency 1 within 0.5 ms of batching off: "
          f"{'met' if on1.p50_ms - off1.p50_ms <= 0.5 else 'MISSED'} ({on1.p50_ms - off1.p50_ms:+.2f} ms)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
