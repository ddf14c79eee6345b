"""The embedded gunicorn that runs the frontend workers (``python -m serving frontend``).

gthread workers by default: a thread blocked on a model call costs little, so many threads per
worker keep ``/ping`` answering while every model call is busy. ``ONEBOX_FRONTEND_WORKER_CLASS=
gevent`` runs each worker on one thread with a greenlet per request instead: no GIL hand-offs
between a worker's threads, which on a 16-core GPU host cut the frontends' CPU per image request
by 15-27% and served 16% more images/s (benchmarks/RESULTS.md). The master forks workers before
anything else is set up, and no framework is ever imported here, so nothing touches CUDA before
fork.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
from pathlib import Path

from gunicorn.app.base import BaseApplication

from serving import heap
from serving.http.app import create_app
from serving.http.routing import HostRouter
from serving.ipc.directory import read_hosts_file
from serving.metrics.exposition import mark_dead
from serving.metrics.process import ProcessSampler
from serving.settings import Settings

#: how often a worker adds what it counted to the metrics (serving.metrics.tally)
METRICS_PERIOD_S = 1.0
#: onebox's own worker class, by the name ONEBOX_FRONTEND_WORKER_CLASS gives it
WORKER_CLASSES = {"loop": "serving.http.loop.LoopWorker"}


class FrontendApplication(BaseApplication):
    """gunicorn configured from :class:`Settings`, serving :func:`create_app`."""

    def __init__(self, settings: Settings, hosts: list[dict]):
        self.settings = settings
        self.hosts = hosts
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options = {
            "bind": f"{s.bind_host}:{s.port}",
            "workers": s.workers,
            # gevent: gunicorn patches the worker's sockets itself
            "worker_class": WORKER_CLASSES.get(s.worker_class, s.worker_class),
            "threads": s.threads,
            # a worker is only restarted for real hangs; model calls carry their own deadline
            "timeout": int(s.timeout_s) + 30,
            "graceful_timeout": int(s.graceful_timeout_s),
            "keepalive": 75,  # longer than load balancers' idle timeouts (SageMaker front ends reuse connections)
            "backlog": 2048,
            "loglevel": logging.getLevelName(s.log_level).lower(),
            "accesslog": None,
            "errorlog": "-",
            "proc_name": "onebox-frontend",
            "limit_request_line": 8190,
        }
        if "control_socket_disable" in self.cfg.settings:
            # gunicorn >= 25 opens a control socket in $HOME by default: one path shared by every
            # server on the machine, and unwritable in read-only containers; onebox never uses it
            options["control_socket_disable"] = True
        options["post_worker_init"] = functools.partial(_start_worker, s.gc_freeze)
        options["worker_exit"] = _stop_worker
        # a dead worker's gauges leave the sums; its counters stay (serving.metrics.exposition)
        options["child_exit"] = lambda server, worker: mark_dead(worker.pid, s.metrics_dir)
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        return create_app(self.settings, HostRouter(self.hosts, self.settings.ipc_shm_min_bytes))


def _start_worker(gc_freeze: bool, worker) -> None:
    """A worker has its app: publish its metrics once a second (the loop worker does it on its
    own loop), and freeze what it holds (serving.heap)."""
    invocations = _invocations(worker)
    if invocations is not None and not getattr(worker, "publishes_metrics", False):
        threading.Thread(
            target=_publish, args=(worker, invocations), name="onebox-metrics", daemon=True
        ).start()
    if gc_freeze:  # once a worker has its app, its collections stop scanning it
        heap.settle()


def _publish(worker, invocations) -> None:
    sampler = ProcessSampler("frontend")
    stop = threading.Event()
    while worker.alive and not stop.wait(METRICS_PERIOD_S):
        try:
            invocations.tally.flush()
            sampler.sample()
        except Exception:  # a metric never stops a worker
            logging.getLogger("onebox.metrics").exception("publishing the worker's metrics failed")


def _stop_worker(server, worker) -> None:
    """The worker is exiting: what it counted since its last publication, and its last EMF lines."""
    invocations = _invocations(worker)
    if invocations is not None:
        invocations.tally.close()


def _invocations(worker):
    return getattr(getattr(worker, "wsgi", None), "extensions", {}).get("onebox.invocations")


def run_frontend(run_dir: Path) -> int:
    """Entry point of the frontend master process."""
    settings = Settings.from_env()
    # gthread workers run many threads; a thread woken by its socket (a body arriving, the host
    # answering) should not wait the default 5 ms for the GIL behind a busy one. Workers inherit it.
    sys.setswitchinterval(0.0005)
    FrontendApplication(settings, read_hosts_file(run_dir)).run()
    return 0
