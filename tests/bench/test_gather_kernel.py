"""benchmarks/gather_kernel.py without a GPU: the kernel's argument, its grid, its NVRTC compile."""

from __future__ import annotations

import ctypes

import pytest


def test_the_segment_table_is_laid_out_as_the_kernels_struct():
    from benchmarks import gather_kernel

    assert ctypes.sizeof(gather_kernel.Segment) == 24
    assert (
        ctypes.sizeof(gather_kernel.Table) == 24 * gather_kernel.MAX_SEGMENTS <= 4096
    )  # a kernel argument's limit
    assert f"#define ONEBOX_MAX_SEGMENTS {gather_kernel.MAX_SEGMENTS}\n" in gather_kernel.SOURCE
    table = gather_kernel.Table()
    gather_kernel.fill(table, [(1, 2, 3), (4, 5, 6)])
    words = (ctypes.c_uint64 * 6).from_buffer(table)
    assert list(words) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "count,largest,sms,blocks",
    [
        (18, 750_000, 132, 15),  # ~2 blocks a multiprocessor over 18 rows
        (1, 750_000, 132, 184),  # one segment: as many blocks as it has 16-byte loads for
        (1, 4096, 132, 1),  # a small segment needs one block
        (200, 750_000, 132, 2),
    ],
)
def test_blocks_per_segment(count, largest, sms, blocks):
    from benchmarks.gather_kernel import blocks_per_segment

    assert blocks_per_segment(count, largest, sms) == blocks


def test_the_kernel_compiles_with_nvrtc_for_a_hopper_gpu():
    from benchmarks import gather_kernel

    try:
        gather_kernel._nvrtc()
    except OSError:
        pytest.skip("needs NVRTC (libnvrtc, which CUDA builds of torch bring)")
    image = gather_kernel.compile_kernel("90")
    assert image[:4] == b"\x7fELF" and gather_kernel.KERNEL_NAME.encode() in image
    with pytest.raises(RuntimeError, match="could not compile"):
        gather_kernel.compile_kernel("1")  # no such architecture: NVRTC's log is in the error
