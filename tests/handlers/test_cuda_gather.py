"""A batch input read in one gather from where its parts lie (handlers.cuda_gather), on the CPU.

On a GPU the views are CUDA tensors at host addresses and the device runs the gather; here they
are CPU tensors over the same memory, so which pieces are read, from where, in which item size,
and what is refused are checked on any machine (tests/handlers/test_cuda_rows.py runs it on a GPU).
"""

from __future__ import annotations

import ctypes
import logging
import mmap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from handlers.cuda_gather import HostGather  # noqa: E402
from handlers.cuda_inputs import Lane, device_inputs  # noqa: E402
from handlers.host_memory import PinnedRegions  # noqa: E402

ROW = (3, 4, 4)  # 48 bytes a uint8 row, 192 a float32 one


class Views:
    """CPU tensors over host memory, recording each view made."""

    def __init__(self, fail: bool = False):
        self.made: list[tuple[int, int, int]] = []
        self.fail = fail

    def __call__(self, address, nbytes, itemsize, device):
        if self.fail:
            raise RuntimeError("CUDA error: invalid argument")
        self.made.append((address, nbytes, itemsize))
        buffer = (ctypes.c_char * nbytes).from_address(address)
        return torch.frombuffer(buffer, dtype=torch.uint8 if itemsize == 1 else torch.int64)


class Region:
    """A page-aligned mapping holding arrays end to end from ``offset``, as a frontend's region."""

    def __init__(self, arrays: list[np.ndarray], offset: int = 0):
        self.map = mmap.mmap(-1, 1 << 16)
        whole = np.frombuffer(self.map, np.uint8)
        self.start = whole.ctypes.data
        self.span = (self.start, self.start + len(whole))
        self.views, at = [], offset
        for a in arrays:
            view = np.frombuffer(self.map, a.dtype, a.size, at).reshape(a.shape)
            view[...] = a
            self.views.append(view)
            at += -(-a.nbytes // 64) * 64 if offset % 8 == 0 else a.nbytes


def images(*counts: int, dtype=np.uint8) -> list[np.ndarray]:
    rng = np.random.default_rng(sum(counts))
    return [rng.integers(0, 255, (n, *ROW)).astype(dtype) for n in counts]


def spans_of(*regions: Region):
    def span(array):
        address = array.ctypes.data
        for region in regions:
            if region.span[0] <= address and address + array.nbytes <= region.span[1]:
                return region.span
        return None

    return span


def staging_for(target):
    asked = []

    def host():
        asked.append(1)
        if not hasattr(host, "tensor"):
            host.tensor = torch.zeros(target.shape, dtype=target.dtype)
        return host.tensor

    return host, asked


def test_parts_in_regions_are_read_where_they_lie_in_8_byte_items():
    region = Region(images(2, 1, 3))
    target = torch.zeros((8, *ROW), dtype=torch.uint8)
    host, asked = staging_for(target)
    views = Views()
    gather = HostGather(enabled=True, view=views)
    assert gather.gather(region.views, target, spans_of(region), host)
    np.testing.assert_array_equal(target[:6].numpy(), np.concatenate(region.views))
    assert not target[6:].any(), "rows past the parts (padding) are not the gather's"
    assert asked == []  # nothing staged
    assert views.made == [(region.start, len(region.map), 8)]  # one view of the whole region
    assert (gather.gathered, gather.pieces) == (1, 3)


def test_parts_elsewhere_are_staged_and_read_as_one_run():
    region = Region(images(1))
    loose = images(2, 1)
    parts = [loose[0], loose[1], region.views[0], *images(2)]
    target = torch.zeros((6, *ROW), dtype=torch.uint8)
    host, asked = staging_for(target)
    gather = HostGather(enabled=True, view=Views())
    assert gather.gather(parts, target, spans_of(region), host)
    np.testing.assert_array_equal(target.numpy(), np.concatenate(parts))
    staged = host.tensor.numpy()
    np.testing.assert_array_equal(staged[:3], np.concatenate(parts[:2]))  # at the parts' own rows
    np.testing.assert_array_equal(staged[4:6], parts[3])
    assert gather.pieces == 3  # the first two staged parts are one piece


def test_a_part_off_an_8_byte_boundary_makes_the_gather_read_bytes():
    region = Region(images(1, 2), offset=3)
    target = torch.zeros((3, *ROW), dtype=torch.uint8)
    views = Views()
    gather = HostGather(enabled=True, view=views)
    assert gather.gather(region.views, target, spans_of(region), staging_for(target)[0])
    np.testing.assert_array_equal(target.numpy(), np.concatenate(region.views))
    assert [itemsize for *_, itemsize in views.made] == [1]


def test_float_rows_land_at_their_bytes():
    region = Region(images(2, 2, dtype=np.float32))
    target = torch.zeros((4, *ROW), dtype=torch.float32)
    gather = HostGather(enabled=True, view=Views())
    assert gather.gather(region.views, target, spans_of(region), staging_for(target)[0])
    np.testing.assert_array_equal(target.numpy(), np.concatenate(region.views))


@pytest.mark.parametrize(
    "parts, rows",
    [
        (images(2, dtype=np.float32), 4),  # another dtype: the copy path casts it
        ([np.zeros((2, 3, 4, 5), np.uint8)], 4),  # another row shape: the copy path refuses it
        ([np.zeros((4, 3, 4, 8), np.uint8)[:, :, :, ::2]], 4),  # strided
        (images(3, 2), 4),  # more rows than the target holds
        ([], 4),
    ],
)
def test_what_the_gather_cannot_take_is_left_to_the_copy_path_untouched(parts, rows):
    target = torch.zeros((rows, *ROW), dtype=torch.uint8)
    host, asked = staging_for(target)
    gather = HostGather(enabled=True, view=Views())
    assert not gather.gather(parts, target, lambda a: None, host)
    assert asked == [] and not target.any() and gather.enabled


def test_a_failing_view_turns_the_gather_off_for_good(caplog):
    region = Region(images(2))
    target = torch.zeros((2, *ROW), dtype=torch.uint8)
    gather = HostGather(enabled=True, view=Views(fail=True))
    with caplog.at_level(logging.WARNING):
        assert not gather.gather(region.views, target, spans_of(region), staging_for(target)[0])
    assert not gather.enabled and "copies from now on" in caplog.text
    assert not gather.gather(region.views, target, spans_of(region), staging_for(target)[0])


def test_views_are_made_once_per_region():
    region = Region(images(1, 1))
    views = Views()
    gather = HostGather(enabled=True, view=views)
    for _ in range(3):
        target = torch.zeros((2, *ROW), dtype=torch.uint8)
        assert gather.gather(region.views, target, spans_of(region), staging_for(target)[0])
        np.testing.assert_array_equal(target.numpy(), np.concatenate(region.views))
    assert len(views.made) == 1


def test_device_inputs_read_registered_parts_through_the_gather_and_pad_after_it():
    # the region table's spans decide what is read where it lies; padding repeats the last row
    table = PinnedRegions(
        register=lambda address, size: 0, unregister=lambda address: 0, synchronize=lambda: None
    )
    table._ops = lambda: (table._register, table._unregister, table._synchronize)
    table.enable(0)
    region = Region(images(2, 1))
    retire = table.pin(region.map)
    assert retire is not None and table.flush(10)
    loose = images(2)[0]
    parts = [region.views[0], loose, region.views[1]]
    from serving.types import Rows

    target = torch.zeros((8, *ROW), dtype=torch.uint8)
    staging = {}

    def stage(slot, shape, dtype):
        return staging.setdefault(slot, torch.zeros(shape, dtype=torch.uint8))

    gather = HostGather(enabled=True, view=Views())
    lane = Lane(stream=None, pool=None, done=None)
    (out,) = device_inputs(
        lane, [Rows(parts, 8)], "cpu", stage, into=[target], regions=table, driver=None, gather=gather
    )
    joined = np.concatenate(parts)
    np.testing.assert_array_equal(out[:5].numpy(), joined)
    np.testing.assert_array_equal(out[5:].numpy(), np.repeat(joined[-1:], 3, axis=0))
    assert (gather.gathered, gather.pieces) == (1, 3)
    retire()
