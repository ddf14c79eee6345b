"""A closed-loop HTTP/1.1 load generator built to cost the server under test as little CPU as possible.

Each client holds one keep-alive connection and has exactly one request in flight: it sends the
next request as soon as the previous answer is complete. All clients of a process share one
``epoll`` loop (no thread per client, so no GIL hand-offs), the request bytes are built once and
sent with one ``send``, and answers are framed by ``Content-Length`` only. Clients are spread over
several processes when one process cannot keep up.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import resource
import selectors
import socket
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

#: called with (status, body) for a sample of answers; returns an error message or None
Verify = Callable[[int, bytes], "str | None"]

_READ = 65536
_SELECT_S = 0.05


@dataclass
class LoadResult:
    """What one load run measured. Latencies are in milliseconds."""

    concurrency: int
    duration_s: float
    requests: int  # answers completed inside the measured window (any status)
    errors: dict[str, int] = field(default_factory=dict)  # non-2xx by status, transport failures by kind
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    mean_ms: float = math.nan
    verified: int = 0
    verify_failures: int = 0
    first_failure: str | None = None
    client_cpu_s: float = 0.0  # CPU the load generator itself used during the run (all processes)

    @property
    def rps(self) -> float:
        """Requests per second over the measured window."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        """All failed requests, whatever the kind."""
        return sum(self.errors.values())


def build_request(method: str, host: str, port: int, path: str, body: bytes = b"",
                  headers: dict[str, str] | None = None) -> bytes:  # fmt: skip
    """The exact bytes of one keep-alive HTTP/1.1 request."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{key}: {value}" for key, value in (headers or {}).items()]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_response(buf: bytearray) -> tuple[int, int, bool, int] | None:
    """``(status, body start, keep alive, body length)`` once the head of an answer is in ``buf``.

    None while the head is incomplete; ``ValueError`` for an answer this client cannot frame
    (no Content-Length).
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1")
    lines = head.split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    status = int(parts[1])
    length = None
    keep_alive = parts[0] == "HTTP/1.1"
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection":
            keep_alive = value.strip().lower() == "keep-alive"
        elif name == "transfer-encoding" and "chunked" in value.lower():
            raise ValueError("chunked answers are not supported by the load generator")
    if length is None:
        raise ValueError("the answer has no Content-Length")
    return status, end + 4, keep_alive, length


class _Client:
    """One connection with at most one request in flight."""

    __slots__ = ("sock", "buf", "sent_at", "head", "unsent")

    def __init__(self):
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.sent_at = 0.0
        self.head: tuple[int, int, bool, int] | None = None
        self.unsent: memoryview | None = None  # the rest of a request the socket did not take at once


@dataclass
class _Plan:
    address: tuple[str, int]
    request: bytes
    clients: int
    start: float  # time.time() at which every process begins (warm-up starts)
    warmup_s: float
    duration_s: float
    timeout_s: float
    verify: Verify | None
    verify_every: int


def _run_clients(plan: _Plan) -> dict:
    """One process's share of the clients; returns raw counts and latencies."""
    sel = selectors.DefaultSelector()
    latencies = array("d")
    errors: Counter[str] = Counter()
    verified = failures = 0
    first_failure = None
    answered = 0

    def connect(client: _Client) -> None:
        sock = socket.create_connection(plan.address, timeout=plan.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(plan.request) > 65536:  # room for a whole request, so one send usually takes it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, min(2 * len(plan.request), 1 << 22))
        sock.setblocking(False)
        client.sock, client.buf, client.head, client.unsent = sock, bytearray(), None, None
        sel.register(sock, selectors.EVENT_READ, client)

    def drop(client: _Client) -> None:
        if client.sock is not None:
            sel.unregister(client.sock)
            client.sock.close()
            client.sock = None

    def send(client: _Client) -> None:
        if client.sock is None:
            connect(client)
        client.sent_at = time.perf_counter()
        sent = client.sock.send(plan.request)
        if sent < len(plan.request):
            # the rest goes out as the server reads: never block the loop (and every other
            # client of this process) on one connection the server has not got to yet
            client.unsent = memoryview(plan.request)[sent:]
            sel.modify(client.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def send_rest(client: _Client) -> None:
        sent = client.sock.send(client.unsent)
        client.unsent = client.unsent[sent:] if sent < len(client.unsent) else None
        if client.unsent is None:
            sel.modify(client.sock, selectors.EVENT_READ, client)

    clients = [_Client() for _ in range(plan.clients)]
    delay = plan.start - time.time()
    if delay > 0:
        time.sleep(delay)
    cpu_start = _cpu_seconds()
    now = time.perf_counter()
    measure_from = now + plan.warmup_s
    measure_to = measure_from + plan.duration_s

    def restart(client: _Client, kind: str, at: float) -> None:
        drop(client)
        if measure_from <= at < measure_to:
            errors[kind] += 1
        if at < measure_to:
            start_request(client)

    def start_request(client: _Client) -> None:
        try:
            send(client)
        except OSError:  # retried (and counted) by the periodic check below, not in a busy loop
            drop(client)

    for client in clients:
        start_request(client)
    next_check = 0.0
    while True:
        now = time.perf_counter()
        if now >= measure_to:
            break
        for key, events in sel.select(min(_SELECT_S, measure_to - now)):
            client: _Client = key.data
            if client.sock is None:  # dropped earlier in this round
                continue
            if events & selectors.EVENT_WRITE and client.unsent is not None:
                try:
                    send_rest(client)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    restart(client, "reset", time.perf_counter())
                    continue
            if not events & selectors.EVENT_READ:
                continue
            try:
                chunk = client.sock.recv(_READ)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                restart(client, "reset", time.perf_counter())
                continue
            if not chunk:
                restart(client, "closed", time.perf_counter())
                continue
            client.buf += chunk
            try:
                if client.head is None:
                    client.head = parse_response(client.buf)
                    if client.head is None:
                        continue
            except ValueError:
                restart(client, "protocol", time.perf_counter())
                continue
            status, start, keep_alive, length = client.head
            if len(client.buf) < start + length:
                continue
            done = time.perf_counter()
            if measure_from <= done < measure_to:
                latencies.append(done - client.sent_at)
                if not 200 <= status < 300:
                    errors[str(status)] += 1
                answered += 1
                if plan.verify is not None and answered % plan.verify_every == 1 % plan.verify_every:
                    verified += 1
                    problem = plan.verify(status, bytes(client.buf[start : start + length]))
                    if problem:
                        failures += 1
                        first_failure = first_failure or problem
            del client.buf[: start + length]
            client.head = None
            if done >= measure_to:
                break
            if not keep_alive:
                drop(client)
            start_request(client)
        now = time.perf_counter()
        if now < next_check:
            continue
        next_check = now + _SELECT_S
        # clients whose answers never came, or that could not reconnect
        for client in clients:
            if client.sock is None or now - client.sent_at > plan.timeout_s:
                restart(client, "timeout" if client.sock is not None else "connect", now)
    cpu = _cpu_seconds() - cpu_start
    for client in clients:
        drop(client)
    sel.close()
    return {"latencies": latencies.tobytes(), "errors": dict(errors), "verified": verified,
            "failures": failures, "first_failure": first_failure, "cpu": cpu}  # fmt: skip


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(plan: _Plan, conn) -> None:
    try:
        conn.send(_run_clients(plan))
    except BaseException as exc:  # the parent must hear about it instead of waiting forever
        conn.send({"crash": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def run_load(url: str, *, body: bytes = b"", method: str = "POST", headers: dict[str, str] | None = None,
             concurrency: int = 1, duration_s: float = 10.0, warmup_s: float = 2.0,
             processes: int | None = None, timeout_s: float = 30.0, verify: Verify | None = None,
             verify_every: int = 100) -> LoadResult:  # fmt: skip
    """Drive ``url`` with ``concurrency`` closed-loop keep-alive clients and measure it.

    Answers completing in the first ``warmup_s`` seconds are not counted; then answers are
    counted for ``duration_s`` seconds. ``processes`` defaults to one process per 64 clients,
    at most one per CPU. ``verify(status, body)`` sees every ``verify_every``-th counted answer
    of each process and returns an error message or None.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// URLs are supported, not {url!r}")
    host, port = parts.hostname, parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    request = build_request(method, host, port, path, body, headers)
    if processes is None:
        processes = min(os.cpu_count() or 1, max(1, math.ceil(concurrency / 64)))
    processes = max(1, min(processes, concurrency))
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    start = time.time() + (0.2 if processes > 1 else 0.0)
    plans = [_Plan((host, port), request, n, start, warmup_s, duration_s, timeout_s, verify, max(1, verify_every))
             for n in shares]  # fmt: skip
    if processes == 1:
        outcomes = [_run_clients(plans[0])]
    else:
        outcomes = _in_processes(plans, warmup_s + duration_s + timeout_s + 30)
    return _combine(concurrency, duration_s, outcomes)


def _in_processes(plans: list[_Plan], limit_s: float) -> list[dict]:
    # fork: clients start at once and ``verify`` may be any callable, not only a picklable one
    ctx = multiprocessing.get_context("fork")
    running = []
    for plan in plans:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(plan, child), daemon=True)
        proc.start()
        child.close()
        running.append((proc, parent))
    outcomes = []
    for proc, parent in running:
        if not parent.poll(limit_s):
            proc.kill()
            raise RuntimeError("a load generator process did not finish")
        outcome = parent.recv()
        proc.join()
        if "crash" in outcome:
            raise RuntimeError(f"a load generator process failed: {outcome['crash']}")
        outcomes.append(outcome)
    return outcomes


def _combine(concurrency: int, duration_s: float, outcomes: list[dict]) -> LoadResult:
    latencies = array("d")
    errors: Counter[str] = Counter()
    result = LoadResult(concurrency, duration_s, 0)
    for outcome in outcomes:
        latencies.frombytes(outcome["latencies"])
        errors.update(outcome["errors"])
        result.verified += outcome["verified"]
        result.verify_failures += outcome["failures"]
        result.first_failure = result.first_failure or outcome["first_failure"]
        result.client_cpu_s += outcome["cpu"]
    result.requests = len(latencies)
    result.errors = dict(errors)
    if latencies:
        ordered = sorted(latencies)
        result.p50_ms, result.p90_ms, result.p99_ms = (_percentile(ordered, q) * 1e3 for q in (50, 90, 99))
        result.max_ms = ordered[-1] * 1e3
        result.mean_ms = sum(ordered) / len(ordered) * 1e3
    return result


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
