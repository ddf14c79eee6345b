"""Find the devices of this machine without importing an ML framework.

NVIDIA GPUs through NVML (``nvidia-ml-py``), honouring ``CUDA_VISIBLE_DEVICES``; the CPU always.
(Neuron devices will be counted from ``/dev/neuron*`` once a Neuron handler exists.)
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def nvidia_gpus(visible: str | None) -> list[int]:
    """Physical indices of the usable NVIDIA GPUs (empty without NVML or a driver)."""
    try:
        import pynvml  # nvidia-ml-py: a thin ctypes binding, no CUDA context is created
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        count = pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()
    indices = list(range(count))
    if visible is None:
        return indices
    chosen = []
    for part in visible.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < count:
            chosen.append(int(part))
        elif part:
            # UUIDs / MIG ids: keep them opaque, one host per entry, in the given order
            log.warning("CUDA_VISIBLE_DEVICES entry %r is not an index; treating it as one GPU", part)
            chosen.append(part)  # type: ignore[arg-type]
    return chosen


def gpu_utilisation() -> list[dict]:
    """Utilisation and memory of every GPU NVML sees (for metrics and benchmarks)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            out.append(
                {"index": i, "gpu_percent": util.gpu, "memory_used": mem.used, "memory_total": mem.total}
            )
        return out
    finally:
        pynvml.nvmlShutdown()
