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

import logging
import sys
from pathlib import Path

from gunicorn.app.base import BaseApplication

from serving import heap
from serving.http.app import create_app
from serving.http.routing import HostRouter
from serving.ipc.directory import read_hosts_file
from serving.settings import Settings

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
        if s.gc_freeze:  # once a worker has its app, its collections stop scanning it (serving.heap)
            options["post_worker_init"] = _settle_worker
        for key, value in options.items():
            self.cfg.set(key, value)

    def load(self):
        return create_app(self.settings, HostRouter(self.hosts, self.settings.ipc_shm_min_bytes))


def _settle_worker(worker) -> None:
    heap.settle()


def run_frontend(run_dir: Path) -> int:
    """Entry point of the frontend master process."""
    settings = Settings.from_env()
    # gthread workers run many threads; a thread woken by its socket (a body arriving, the host
    # answering) should not wait the default 5 ms for the GIL behind a busy one. Workers inherit it.
    sys.setswitchinterval(0.0005)
    FrontendApplication(settings, read_hosts_file(run_dir)).run()
    return 0
