"""Assembling a batch's rows with several threads: one copy thread moves ~5 GB/s.

A batch of 86 ResNet-50 images (13 MB of uint8) took 2.7 ms to assemble in pinned memory on the
H200 host, with the GPU idle meanwhile (benchmarks/RESULTS.md). numpy releases the GIL while it
copies a contiguous block, so threads that each copy their share of the rows run side by side.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: a batch smaller than this is copied on the calling thread (a hand-off costs more)
MIN_BYTES = 1 << 20

# (source rows, target rows) of one thread's share
_Job = list[tuple[np.ndarray, slice]]


class RowCopier:
    """Copies arrays row-wise, end to end, into one array, spread over ``threads`` threads."""

    def __init__(self, threads: int, name: str = "model"):
        self.threads = max(1, threads)
        self._pool = (
            ThreadPoolExecutor(self.threads - 1, thread_name_prefix=f"{name}-copy")
            if self.threads > 1
            else None
        )

    def join(self, arrays: list[np.ndarray], out: np.ndarray) -> None:
        """``np.concatenate(arrays, out=out)``, the rows split evenly between the threads (this
        one takes a share too)."""
        if self._pool is None or out.nbytes < MIN_BYTES or len(out) < 2:
            np.concatenate(arrays, out=out)
            return
        jobs = _shares(arrays, len(out), min(self.threads, len(out)))
        futures = [self._pool.submit(_copy, job, out) for job in jobs[1:]]
        _copy(jobs[0], out)
        for future in futures:
            future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


def _shares(arrays: list[np.ndarray], rows: int, count: int) -> list[_Job]:
    """``count`` lists of (source rows, target rows), consecutive and about equal in rows."""
    per = -(-rows // count)
    jobs: list[_Job] = [[] for _ in range(count)]
    at = 0
    for array in arrays:
        start = 0
        while start < len(array):
            job = at // per
            take = min(len(array) - start, (job + 1) * per - at)
            jobs[job].append((array[start : start + take], slice(at, at + take)))
            start += take
            at += take
    return [job for job in jobs if job]


def _copy(job: _Job, out: np.ndarray) -> None:
    for source, target in job:
        np.copyto(out[target], source, casting="same_kind")
