"""What a process costs (CPU, resident memory), and the GPUs' utilisation and memory through NVML.

Every frontend worker and model host calls :meth:`ProcessSampler.sample` about once a second:
two cheap reads (``getrusage``, ``/proc/self/statm``). The CPU counter of a process that died
stays in the sum (a counter never goes down); its memory leaves the gauge once it is marked dead
(serving.metrics.exposition.mark_dead).

GPUs are read at scrape time by the frontend that answers it, through ``pynvml`` (the
``nvidia-ml-py`` package, ``onebox[gpu]``) when it is importable and NVML finds a GPU; without
either there are simply no ``onebox_gpu_*`` series. No ML framework is imported.
"""

from __future__ import annotations

import logging
import os
import resource

from prometheus_client.core import GaugeMetricFamily

from serving.metrics import families

log = logging.getLogger("onebox.metrics")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class ProcessSampler:
    """Adds this process's CPU time since the last sample to the counter, sets its memory."""

    def __init__(self, role: str, device: str = ""):
        self.cpu = families.CPU_SECONDS.labels(role, device)
        self.memory = families.RESIDENT_BYTES.labels(role, device)
        self._cpu_seen = 0.0

    def sample(self) -> None:
        """Read and publish (never raises: a metric never stops a process)."""
        try:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu = usage.ru_utime + usage.ru_stime
            if cpu > self._cpu_seen:
                self.cpu.inc(cpu - self._cpu_seen)
                self._cpu_seen = cpu
            rss = _resident_bytes()
            if rss is not None:
                self.memory.set(rss)
        except Exception as exc:  # pragma: no cover - a platform without these
            log.debug("process sample failed: %s", exc)


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class GpuCollector:
    """A prometheus_client collector of every GPU NVML sees: utilisation and memory."""

    def __init__(self, nvml=None):
        self._nvml = nvml  # the pynvml module (tests pass a stand-in)
        self._ready = False

    def _init(self):
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                return None
            self._nvml = pynvml
        if not self._ready:
            try:
                self._nvml.nvmlInit()
            except Exception:  # no driver, no GPU
                return None
            self._ready = True
        return self._nvml

    def collect(self):
        nvml = self._init()
        if nvml is None:
            return []
        util = GaugeMetricFamily("onebox_gpu_utilization_percent", "GPU busy time over the last sample period (NVML)",
                                 labels=["device"])  # fmt: skip
        used = GaugeMetricFamily(
            "onebox_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["device"]
        )
        total = GaugeMetricFamily("onebox_gpu_memory_total_bytes", "GPU memory (NVML)", labels=["device"])
        try:
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                device = f"cuda{i}"
                util.add_metric([device], nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric([device], memory.used)
                total.add_metric([device], memory.total)
        except Exception as exc:  # a GPU that fell off the bus must not break the scrape
            log.warning("reading the GPUs through NVML failed: %s", exc)
            return []
        if not util.samples:
            return []
        return [util, used, total]
