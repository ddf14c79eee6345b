"""``GET /metrics``: every process's metrics in Prometheus text format; the directory they live in.

The launcher prepares the multiprocess directory (:func:`prepare_directory`) and gives its path
to every process it starts as ``PROMETHEUS_MULTIPROC_DIR``; gunicorn's master and the host
supervisor mark a process that died (:func:`mark_dead`), so its gauges leave the sums while its
counters and histograms stay in them. A scrape, answered by whichever frontend worker takes it,
reads every process's files (prometheus_client's ``MultiProcessCollector``) and asks NVML about
the GPUs.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from serving.metrics import families
from serving.metrics.process import GpuCollector

log = logging.getLogger("onebox.metrics")

_GPUS = GpuCollector()


def prepare_directory(path: Path) -> None:
    """Create ``path``, or empty it of an earlier run's metric files (prometheus_client's ``*.db``:
    a directory not wiped between runs would add the old counts to the new ones)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


def mark_dead(pid: int, path: Path | None) -> None:
    """Process ``pid`` exited: its live gauges (memory, queue depth, models loaded) leave the sums."""
    if path is None:
        return
    try:
        multiprocess.mark_process_dead(pid, str(path))
    except OSError as exc:
        log.debug("marking process %d dead in %s: %s", pid, path, exc)


class _Files:
    """prometheus_client's multiprocess collector over the files that are set up: a process
    creating its file while a scrape globs the directory leaves it empty for a moment, which
    ``MultiProcessCollector`` cannot read (struct.error)."""

    def __init__(self, directory: Path):
        self.directory = directory

    def collect(self):
        for _ in range(3):
            try:
                return multiprocess.MultiProcessCollector.merge(self._files(), accumulate=True)
            except (OSError, struct.error):  # a dead process's gauge file removed as it was read
                continue
        return multiprocess.MultiProcessCollector.merge(self._files(), accumulate=True)

    def _files(self) -> list[str]:
        files = []
        for path in sorted(self.directory.glob("*.db")):
            try:
                if path.stat().st_size >= 8:  # its header (bytes used) is written
                    files.append(str(path))
            except OSError:  # marked dead meanwhile
                continue
        return files


def scrape(directory: Path | None) -> tuple[bytes, str]:
    """The Prometheus text of every process writing into ``directory`` (None: this process's own,
    when no launcher set one up), and its content type."""
    if directory is None:
        registry = families.REGISTRY
        body = generate_latest(registry)
    else:
        registry = CollectorRegistry()
        registry.register(_Files(directory))
        body = generate_latest(registry)
    gpus = CollectorRegistry(auto_describe=True)
    gpus.register(_GPUS)
    return body + generate_latest(gpus), CONTENT_TYPE_LATEST
