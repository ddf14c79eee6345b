"""What the whole onebox stack costs next to a bare Flask + gunicorn echo app under the same gunicorn.

One run prints requests/s and p50/p99 at concurrency 1, 8 and 32 for a trivial ONNX model
(``y = x + 1`` on a ``[1, 4]`` float32 JSON body) through ``onebox serve``, the same for the echo
app (``benchmarks/echo_app.py``), and their ratios. Target: at concurrency 8 the full stack keeps
at least 85% of the echo's requests/s and a p50 within 1 ms of the echo's.

    .venv/bin/python benchmarks/overhead.py [--duration 5] [--repeats 3] [--workers 2] [--threads 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Service, add_run_options, machine, measure, median_run, spread

BODY = b"[[1.0, 2.0, 3.0, 4.0]]"
LEVELS = (1, 8, 32)


def add_one_model(model_dir: Path) -> Path:
    """An ONNX model ``y = x + 1`` with input ``x`` of shape ``[batch, 4]``."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.ones(4, dtype=np.float32), "one")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(model_dir / "model.onnx"))
    return model_dir


def model_answer(status: int, body: bytes) -> str | None:
    """None when ``body`` is the model's answer to :data:`BODY`, else what is wrong."""
    try:
        values = json.loads(body)
    except ValueError:
        return f"not JSON: {body[:80]!r}"
    flat = values.get("y", values) if isinstance(values, dict) else values
    return None if flat == [[2.0, 3.0, 4.0, 5.0]] else f"wrong answer {body[:80]!r}"


def echo_answer(status: int, body: bytes) -> str | None:
    """None when the echo app answered the body back."""
    return None if body == BODY else f"not an echo: {body[:80]!r}"


def main(argv: list[str] | None = None) -> int:
    """Run both servers at every concurrency and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_options(parser)
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers for both servers")
    parser.add_argument("--threads", type=int, default=32, help="gthread threads per worker for both")
    args = parser.parse_args(argv)
    env = {"SAGEMAKER_MODEL_SERVER_WORKERS": str(args.workers), "ONEBOX_FRONTEND_THREADS": str(args.threads),
           "SAGEMAKER_CONTAINER_LOG_LEVEL": "WARNING"}  # fmt: skip
    print(f"machine: {machine()}")
    print(f"gunicorn: echo gthread, onebox its default (loop); {args.workers} workers x {args.threads} threads, keep-alive; "
          f"{args.repeats} runs of {args.duration:g}s (+{args.warmup:g}s warm-up) each, median shown; the two servers take turns")  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = add_one_model(Path(tmp) / "add_one")
        servers = {
            "echo": (["benchmarks/echo_app.py"], echo_answer),
            "onebox": (["-m", "serving", "serve", str(model_dir)], model_answer),
        }
        with contextlib.ExitStack() as stack:
            # the baseline is Flask under gunicorn's own worker; onebox runs its default (loop)
            envs = {"echo": {**env, "ONEBOX_FRONTEND_WORKER_CLASS": "gthread"}, "onebox": env}
            started = {
                name: stack.enter_context(Service(cmd, envs[name])) for name, (cmd, _) in servers.items()
            }
            for level in LEVELS:
                # both servers stay up and take turns, so drift on the machine hits both alike
                for _ in range(args.repeats):
                    for name, service in started.items():
                        run = measure(service.url, BODY, level, duration_s=args.duration, warmup_s=args.warmup,
                                      repeats=1, verify=servers[name][1])  # fmt: skip
                        results.setdefault((name, level), []).extend(run)
    print()
    print(f"{'conc':>4} | {'echo req/s':>10} {'p50':>6} {'p99':>6} | {'onebox req/s':>12} {'p50':>6} {'p99':>6} "
          f"| {'rps ratio':>9} {'p50 diff':>8} | onebox spread, client CPU")  # fmt: skip
    for level in LEVELS:
        echo, full = median_run(results["echo", level]), median_run(results["onebox", level])
        print(f"{level:>4} | {echo.rps:>10.0f} {echo.p50_ms:>6.2f} {echo.p99_ms:>6.2f} | {full.rps:>12.0f} "
              f"{full.p50_ms:>6.2f} {full.p99_ms:>6.2f} | {full.rps / echo.rps:>9.1%} "
              f"{full.p50_ms - echo.p50_ms:>+7.2f}ms | {spread(results['onebox', level])}, "
              f"{full.client_cpu_s / full.duration_s:.0%} of a core")  # fmt: skip
    print(
        "echo spread (req/s, min-max): " + ", ".join(f"c{lv} {spread(results['echo', lv])}" for lv in LEVELS)
    )
    echo8, full8 = median_run(results["echo", 8]), median_run(results["onebox", 8])
    ok_rps = full8.rps >= 0.85 * echo8.rps
    ok_p50 = full8.p50_ms - echo8.p50_ms <= 1.0
    print(f"target at concurrency 8: req/s >= 85% of echo: {'met' if ok_rps else 'MISSED'} "
          f"({full8.rps / echo8.rps:.1%}); p50 within 1 ms: {'met' if ok_p50 else 'MISSED'} "
          f"({full8.p50_ms - echo8.p50_ms:+.2f} ms)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
