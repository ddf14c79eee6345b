"""The ``onebox`` command: ``serve``, ``detect``, and the internal ``host`` / ``frontend`` roles."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from serving.errors import ConfigError, ServingError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onebox", description="Serve a model behind the SageMaker contract."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a model directory (default: $SAGEMAKER_BASE_DIR/model)")
    serve.add_argument("model_dir", nargs="?", type=Path, help="directory holding the artifact")

    detect = sub.add_parser("detect", help="say what a model directory holds and what it needs")
    detect.add_argument("model_dir", type=Path)
    detect.add_argument("--json", action="store_true", help="print JSON")

    sub.add_parser("bench", help="load-test a running server: latency percentiles, requests/s (bench --help)")

    host = sub.add_parser("host", help=argparse.SUPPRESS)
    host.add_argument("--socket", required=True)
    host.add_argument("--device", default="cpu")
    host.add_argument("--model", action="append", default=[], help="NAME=DIR")
    host.add_argument("--label", default=None, help="its device in the metrics (cuda0, cpu)")
    host.add_argument("--restarted", action="store_true", help="started again after its predecessor died")

    frontend = sub.add_parser("frontend", help=argparse.SUPPRESS)
    frontend.add_argument("--run-dir", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad configuration exits 2 with one line on stderr."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the load generator has its own options
        from serving.bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"onebox: configuration error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from serving.settings import Settings

    if args.command == "host":
        from serving.host.process import run_host

        models = [tuple(m.split("=", 1)) for m in args.model]
        return run_host(args.socket, args.device, models, args.label, args.restarted)
    if args.command == "frontend":
        from serving.http.server import run_frontend

        return run_frontend(args.run_dir)
    if args.command == "detect":
        return _detect(args.model_dir, args.json, Settings.from_env())

    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s [launcher] %(message)s")
    from serving.launcher import serve

    if settings.multi_model:  # models come and go through POST /models and DELETE /models/<name>
        if args.model_dir is not None:
            raise ConfigError(
                "SAGEMAKER_MULTI_MODEL=true loads models through POST /models: give no model directory"
            )
        return serve(settings, None)
    model_dir = args.model_dir if args.model_dir is not None else settings.model_dir
    if not model_dir.is_dir():
        raise ConfigError(f"model directory {model_dir} does not exist (give one: onebox serve MODEL_DIR)")
    return serve(settings, model_dir.resolve())


def _detect(model_dir: Path, as_json: bool, settings) -> int:
    from handlers.registry import describe_detection, detect

    try:
        artifact = detect(model_dir, program=settings.program, model_file=settings.model_file)
    except ServingError as exc:
        if as_json:
            print(json.dumps({"error": exc.message}))
        else:
            print(f"onebox: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(artifact.to_dict(), indent=2) if as_json else describe_detection(artifact))
    return 0
