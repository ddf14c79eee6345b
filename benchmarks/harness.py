"""What the benchmarks share: start a server process, wait for ``/ping``, measure, print tables."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from serving.bench import LoadResult, run_load
from serving.bench.loadgen import Verify
from serving.ipc.client import HostClient
from serving.ipc.directory import read_hosts_file

REPO = Path(__file__).resolve().parents[1]


def add_run_options(parser) -> None:
    """The options every benchmark takes: measured seconds, warm-up and repeats per configuration."""
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds before each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (the median is shown)")


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A server subprocess (``onebox serve`` or the echo app) on a free local port."""

    def __init__(self, args: Sequence[str], env: dict[str, str], ready_timeout: float = 120.0):
        self.port = free_port()
        self.args = [sys.executable, *args]
        # the repository first, then whatever the caller's PYTHONPATH holds (carried wheels on a GPU box)
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, **env, "SAGEMAKER_BIND_TO_PORT": str(self.port),
                    "ONEBOX_BIND_HOST": "127.0.0.1", "PYTHONPATH": path}  # fmt: skip
        self.ready_timeout = ready_timeout
        self.log = Path(tempfile.mkstemp(prefix="onebox-bench-", suffix=".log")[1])

    @property
    def url(self) -> str:
        """The invocation URL."""
        return f"http://127.0.0.1:{self.port}/invocations"

    def __enter__(self) -> Service:
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO
        )
        end = time.monotonic() + self.ready_timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            status, body = self._ping()
            if status == 200:
                return self
            if "failed to load" in body:  # it will not get better: say why now, not after the timeout
                self.__exit__()
                raise RuntimeError(f"the model failed to load: {body}\n{self.log.read_text()[-4000:]}")
            time.sleep(0.2)
        self.__exit__()
        raise TimeoutError(f"server not ready within {self.ready_timeout}s:\n{self.log.read_text()}")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def _ping(self) -> tuple[int | None, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/ping")
            response = conn.getresponse()
            return response.status, response.read().decode("utf-8", "replace")
        except OSError:
            return None, ""
        finally:
            conn.close()


def measure(url: str, body: bytes, concurrency: int, *, duration_s: float, warmup_s: float, repeats: int,
            verify: Verify | None = None) -> list[LoadResult]:  # fmt: skip
    """``repeats`` runs of the same load; every answer must be 2xx and pass ``verify``."""
    results = []
    for _ in range(repeats):
        result = run_load(url, body=body, headers={"Content-Type": "application/json"},
                          concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s,
                          verify=verify, verify_every=50)  # fmt: skip
        if result.error_count or result.verify_failures or not result.requests:
            raise RuntimeError(f"bad answers at concurrency {concurrency}: {result}")
        results.append(result)
    return results


def median_run(results: list[LoadResult]) -> LoadResult:
    """The run with the median throughput (of an even count, the upper middle one)."""
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


def spread(results: list[LoadResult]) -> str:
    """Throughput range over the repeats, as ``min-max``, and the relative spread."""
    rates = [r.rps for r in results]
    low, high = min(rates), max(rates)
    return f"{low:.0f}-{high:.0f} ({(high - low) / statistics.mean(rates) * 100:.0f}%)"


def machine() -> str:
    """One line describing this machine."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return (
        f"{os.cpu_count()} CPUs, {model}, {mem_kb / 1024 / 1024:.1f} GiB RAM, load {os.getloadavg()[0]:.2f}"
    )


def server_roles(pid: int) -> dict[str, list]:
    """The server's processes by role: the model host and the frontends (master and workers)."""
    import psutil

    roles: dict[str, list] = {"host": [], "frontend": []}
    for proc in psutil.Process(pid).children(recursive=True):
        cmd = " ".join(proc.cmdline())
        roles["host" if " host " in f"{cmd} " else "frontend"].append(proc)
    return roles


def split_cpus(count: int, cpus: list[int] | None = None, siblings: dict[int, tuple[int, ...]] | None = None):
    """``count`` CPUs for the model hosts, taken as whole physical cores from the end of the
    list, and the rest: ``(host_cpus, other_cpus)``. ``siblings``: each CPU's hyperthread
    siblings (default: read from sysfs)."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if siblings is None:
        siblings = {}
        for cpu in cpus:
            try:
                text = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text()
            except OSError:
                text = str(cpu)
            siblings[cpu] = tuple(_cpu_list(text))
    hosts: list[int] = []
    for cpu in reversed(cpus):
        if len(hosts) >= count:
            break
        if cpu not in hosts:
            hosts += [c for c in siblings.get(cpu, (cpu,)) if c in cpus and c not in hosts]
    rest = [c for c in cpus if c not in hosts]
    if not rest:
        raise ValueError(f"{count} CPUs for the hosts leave none of {len(cpus)} for the frontends")
    return sorted(hosts), rest


def _cpu_list(text: str) -> list[int]:
    out: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            low, high = part.split("-")
            out += range(int(low), int(high) + 1)
        elif part:
            out.append(int(part))
    return out


def pin_cpus(pid: int, count: int) -> str:
    """Give the server's model hosts ``count`` CPUs of their own (whole cores), and its frontends
    and this process (so the load generators it starts) the others; a description."""
    hosts, rest = split_cpus(count)
    roles = server_roles(pid)
    for role, cpus in (("host", hosts), ("frontend", rest)):
        for proc in roles[role]:
            for thread in proc.threads():
                try:
                    os.sched_setaffinity(thread.id, cpus)
                except OSError:
                    pass
    os.sched_setaffinity(0, rest)
    return f"hosts on CPUs {hosts}, frontends and load on {len(rest)} others"


#: the hosts' time sums (seconds) batch_totals adds up, see ``Host.batch_stats`` in serving/host/process.py
TIME_KEYS = ("queue_s", "build_s", "launch_s", "compute_s", "starved_s", "answer_s", "arrive_s")


def batch_totals(run_dir: Path, model: str = "model") -> Counter:
    """Batches, rows, padding rows and requests (host calls: gathered requests count once) the
    model has run, the hosts' time sums (``TIME_KEYS``), and batches per padded size (int keys),
    summed over every host listed in
    ``run_dir`` (their ``stats`` op; the server must run with ``ONEBOX_RUN_DIR=run_dir``)."""
    totals: Counter = Counter()
    for entry in read_hosts_file(run_dir):
        client = HostClient(entry["socket"])
        try:
            reply = client.stats(time.time() + 5)
            stats = reply["models"].get(model, {})
        finally:
            client.close()
        # frontend regions the host's device copies from (a CUDA host: handlers.host_memory)
        totals["pinned_regions"] += reply.get("pinned", {}).get("regions", 0)
        totals["pin_failures"] += reply.get("pinned", {}).get("failures", 0)
        # the hosts' garbage collections so far, youngest generation first (serving.heap)
        for generation, count in enumerate(reply.get("gc", {}).get("collections", [])):
            totals[f"gc{generation}"] += count
        totals.update(
            {key: stats.get(key, 0) for key in ("batches", "rows", "padding", "requests", "arrivals")}
        )
        totals.update({key: stats.get(key, 0.0) for key in TIME_KEYS})
        totals.update({int(size): count for size, count in stats.get("sizes", {}).items()})
    return totals
