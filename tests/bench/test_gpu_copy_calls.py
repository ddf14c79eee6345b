"""benchmarks/gpu_copy_calls.py's layout of a batch's rows in registered regions, on the CPU.

The timings need a GPU; where the copied rows lie does not, and a wrong layout would time copies
from the wrong memory (or make the script's own check of the copied rows fail on the GPU).
"""

from __future__ import annotations

import mmap

import numpy as np
import pytest

from benchmarks.gpu_copy_calls import rows_in_regions


def host_rows(parts: int, rows: int) -> np.ndarray:
    count = parts * rows
    return np.ascontiguousarray(
        np.broadcast_to(np.arange(count, dtype=np.uint8)[:, None, None], (count, 4, 256))
    )


@pytest.mark.parametrize("memfd", [False, True], ids=["anonymous", "memfd"])
@pytest.mark.parametrize("count", [1, 3, 8])
def test_each_part_lies_in_its_region_holding_its_own_rows(memfd, count):
    host = host_rows(6, 2)  # 6 parts of 2 rows, 2 KiB each
    size = host.nbytes if count == 1 else 8 << 10
    registered, keep = [], []
    parts = rows_in_regions(host, 6, count, size, memfd, keep, registered.append)
    assert len(registered) == count and all(r.nbytes == size for r in registered)
    np.testing.assert_array_equal(np.concatenate(parts), host)
    starts = [r.ctypes.data for r in registered]
    used = set()
    for part in parts:
        address = part.ctypes.data
        index = next(i for i, s in enumerate(starts) if s <= address < s + size)
        assert address + part.nbytes <= starts[index] + size
        used.add(index)
        assert part.flags.c_contiguous and part.flags.writeable != memfd  # memfd: mapped read-only
    assert used == set(range(min(count, 6)))  # spread over every region that has a part
    assert all(isinstance(m, mmap.mmap) for m in keep)


def test_regions_too_small_for_their_parts_are_refused():
    with pytest.raises(SystemExit, match="too small"):
        rows_in_regions(host_rows(6, 2), 6, 2, 4 << 10, False, [], lambda region: None)
