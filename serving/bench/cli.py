"""``onebox bench``: drive a running server at one or more concurrencies and print a table."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from serving.bench.loadgen import LoadResult, run_load

HEADER = f"{'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}"


def format_row(result: LoadResult) -> str:
    """One table line for a result."""
    return (
        f"{result.concurrency:>5} {result.rps:>9.1f} {result.p50_ms:>8.2f} {result.p90_ms:>8.2f} "
        f"{result.p99_ms:>8.2f} {result.max_ms:>8.2f} {result.error_count:>7}"
    )


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``onebox bench`` (also usable as a subparser's parents)."""
    p = argparse.ArgumentParser(prog="onebox bench", description="Closed-loop HTTP load test.")
    p.add_argument("url", help="e.g. http://127.0.0.1:8080/invocations")
    body = p.add_mutually_exclusive_group()
    body.add_argument("--body", help="request body as text")
    body.add_argument("--body-file", type=Path, help="request body read from a file")
    p.add_argument("--content-type", default="application/json")
    p.add_argument("--accept", default=None)
    p.add_argument("--method", default=None, help="default POST with a body, GET without")
    p.add_argument("-c", "--concurrency", default="1,8,32", help="comma-separated client counts")
    p.add_argument("-d", "--duration", type=float, default=10.0, help="measured seconds per concurrency")
    p.add_argument("-w", "--warmup", type=float, default=2.0, help="uncounted seconds before measuring")
    p.add_argument("-p", "--processes", type=int, default=None, help="load generator processes")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as lost")
    p.add_argument("--json", action="store_true", help="print one JSON object per concurrency")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the load test; exit 1 when any request failed, 2 for bad arguments."""
    args = parser().parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        print(f"onebox bench: --concurrency must be integers, not {args.concurrency!r}", file=sys.stderr)
        return 2
    if not levels or min(levels) < 1:
        print("onebox bench: --concurrency needs positive integers", file=sys.stderr)
        return 2
    body = args.body_file.read_bytes() if args.body_file else (args.body or "").encode()
    headers = {"Content-Type": args.content_type} if body else {}
    if args.accept:
        headers["Accept"] = args.accept
    method = args.method or ("POST" if body else "GET")
    if not args.json:
        print(HEADER)
    failed = False
    for level in levels:
        try:
            result = run_load(args.url, body=body, method=method, headers=headers, concurrency=level,
                              duration_s=args.duration, warmup_s=args.warmup, processes=args.processes,
                              timeout_s=args.timeout)  # fmt: skip
        except ValueError as exc:
            print(f"onebox bench: {exc}", file=sys.stderr)
            return 2
        failed = failed or result.error_count > 0 or result.requests == 0
        if args.json:
            print(json.dumps({**asdict(result), "rps": result.rps}), flush=True)
        else:
            print(format_row(result), flush=True)
            if result.errors:
                print(f"      errors: {result.errors}", flush=True)
    return 1 if failed else 0
