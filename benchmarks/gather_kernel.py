"""A batch's copies to the device as one kernel that reads host memory, launched with the GIL held.

Measured by ``gpu_copy_calls.py`` (its ``gather kernel (PyDLL)`` way). A serving host queues
one ``cuMemcpyHtoDAsync`` per part of a batch (handlers.cuda_driver), ~17 for a ResNet-50 batch
of ~90 images at concurrency 256. A device whose threads may read registered host memory at its
host address (``CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM``, as an H100 or H200 on Linux) can
instead copy every part itself: one launch of a small kernel, given a table of (target, source,
bytes) segments as its argument, reads each part where it lies (a registered region, or pinned
memory, which CUDA maps at its host address too). The launch goes through ``ctypes.PyDLL``, as
the driver copies do, so the GIL is kept.

It was tried as a serving path in the twenty-first session (``ONEBOX_CUDA_COPY=gather``,
b82134c): on one H200 it queued 18 parts in 30 µs against 111 µs for 18 driver copies, but the
batch's launch was no shorter served, and in two A/B runs it served less than the driver path
(benchmarks/RESULTS.md). The serving path was taken out; the kernel stays here to be measured.

The kernel is compiled by NVRTC (the library CUDA builds of torch bring) for the device's
architecture.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from collections.abc import Callable, Sequence

#: segments one launch copies (the table is the kernel's argument: 24 bytes a segment, 4 KB at most)
MAX_SEGMENTS = 64
#: threads per block, and blocks the launch aims for per multiprocessor
_THREADS = 256
_BLOCKS_PER_SM = 2
#: CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM, _MULTIPROCESSOR_COUNT, compute capability
_HOST_POINTER_ATTRIBUTE = 91
_SM_COUNT_ATTRIBUTE = 16
_MAJOR_ATTRIBUTE, _MINOR_ATTRIBUTE = 75, 76

KERNEL_NAME = "onebox_gather"
SOURCE = (
    f"#define ONEBOX_MAX_SEGMENTS {MAX_SEGMENTS}\n"
    + r"""
struct onebox_segment { unsigned long long target, source, bytes; };
struct onebox_table { onebox_segment at[ONEBOX_MAX_SEGMENTS]; };

// Block row y copies segment y; the blocks of a row share it, 16 bytes a load where the segment
// is 16-byte aligned at both ends, else a byte at a time.
extern "C" __global__ void onebox_gather(const onebox_table table) {
    const onebox_segment s = table.at[blockIdx.y];
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (((s.target | s.source | s.bytes) & 15ULL) == 0) {
        uint4 *__restrict__ to = (uint4 *)s.target;
        const uint4 *__restrict__ from = (const uint4 *)s.source;
        const unsigned long long n = s.bytes >> 4;
        #pragma unroll 4
        for (; i < n; i += stride) to[i] = from[i];
    } else {
        unsigned char *__restrict__ to = (unsigned char *)s.target;
        const unsigned char *__restrict__ from = (const unsigned char *)s.source;
        for (; i < s.bytes; i += stride) to[i] = from[i];
    }
}
"""
)


class Segment(ctypes.Structure):
    _fields_ = [("target", ctypes.c_uint64), ("source", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class Table(ctypes.Structure):
    """The kernel's one argument, laid out as ``onebox_table``."""

    _fields_ = [("at", Segment * MAX_SEGMENTS)]


def blocks_per_segment(count: int, largest: int, sms: int) -> int:
    """Blocks in each row of the grid: about ``_BLOCKS_PER_SM`` a multiprocessor over all rows,
    and no more than the largest segment has 16-byte loads for."""
    wanted = -(-_BLOCKS_PER_SM * sms // max(count, 1))
    needed = -(-largest // (16 * _THREADS))
    return max(1, min(wanted, needed))


def fill(table: Table, segments: Sequence[tuple[int, int, int]]) -> None:
    """Write ``segments`` (target, source, bytes) into the first rows of ``table``."""
    for row, (target, source, nbytes) in zip(table.at, segments, strict=False):
        row.target, row.source, row.bytes = target, source, nbytes


class GatherKernel:
    """The compiled kernel in this process's CUDA context, launched through the driver.

    Loaded into the device's primary context (torch's), made current on the loading thread if
    it has none. :meth:`launch` returns the ``CUresult`` of the launch (0: queued).
    """

    def __init__(self, device_index: int = 0):
        self.device_index = device_index
        self._function = ctypes.c_void_p()
        self._sms = 0
        self._table = Table()
        self._params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(self._table), ctypes.c_void_p))
        self._launch: Callable[..., int] | None = None

    def load(self) -> str | None:
        """Compile and load the kernel; None when done, else why it cannot be used here."""
        try:
            cuda = ctypes.PyDLL("libcuda.so.1")
        except OSError as exc:
            return f"no CUDA driver ({exc})"
        device = ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(device), self.device_index) != 0:
            return f"no CUDA device {self.device_index}"
        attributes = {}
        for name, number in (
            ("host pointers", _HOST_POINTER_ATTRIBUTE),
            ("sms", _SM_COUNT_ATTRIBUTE),
            ("major", _MAJOR_ATTRIBUTE),
            ("minor", _MINOR_ATTRIBUTE),
        ):
            value = ctypes.c_int()
            if cuda.cuDeviceGetAttribute(ctypes.byref(value), number, device) != 0:
                return f"the device's attributes are not readable ({name})"
            attributes[name] = value.value
        if not attributes["host pointers"]:
            return "the device cannot read registered host memory at its host address"
        context = ctypes.c_void_p()
        if cuda.cuCtxGetCurrent(ctypes.byref(context)) != 0 or not context.value:
            from handlers.cuda_driver import make_current

            if not make_current(self.device_index):
                return "the device's primary context cannot be made current"
        try:
            image = compile_kernel(f"{attributes['major']}{attributes['minor']}")
        except (OSError, RuntimeError) as exc:
            return str(exc)
        module = ctypes.c_void_p()
        error = cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(image))
        if error != 0:
            return f"cuModuleLoadData failed (CUDA error {error})"
        error = cuda.cuModuleGetFunction(ctypes.byref(self._function), module, KERNEL_NAME.encode())
        if error != 0:
            return f"cuModuleGetFunction failed (CUDA error {error})"
        launch = cuda.cuLaunchKernel
        launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        launch.restype = ctypes.c_int
        self._sms, self._launch = attributes["sms"], launch
        return None

    def launch(self, segments: Sequence[tuple[int, int, int]], stream: int) -> int:
        """Queue the copy of up to :data:`MAX_SEGMENTS` segments on ``stream``."""
        assert self._launch is not None and 0 < len(segments) <= MAX_SEGMENTS
        fill(self._table, segments)  # the driver copies the argument when the launch is queued
        grid_x = blocks_per_segment(len(segments), max(s[2] for s in segments), self._sms)
        return self._launch(
            self._function, grid_x, len(segments), 1, _THREADS, 1, 1, 0, stream, self._params, None
        )


def compile_kernel(arch: str) -> bytes:
    """The kernel as a CUBIN for ``sm_<arch>``, compiled by NVRTC; RuntimeError or OSError when
    it cannot be."""
    nvrtc = _nvrtc()
    program = ctypes.c_void_p()
    _check(
        nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), SOURCE.encode(), b"gather.cu", 0, None, None)
    )
    try:
        options = (ctypes.c_char_p * 1)(f"--gpu-architecture=sm_{arch}".encode())
        if nvrtc.nvrtcCompileProgram(program, len(options), options) != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            text = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, text)
            raise RuntimeError(
                f"NVRTC could not compile the gather kernel: {text.value.decode(errors='replace')}"
            )
        size = ctypes.c_size_t()
        _check(nvrtc, nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        image = ctypes.create_string_buffer(size.value)
        _check(nvrtc, nvrtc.nvrtcGetCUBIN(program, image))
        return image.raw
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def _check(nvrtc, result: int) -> None:
    if result != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC error {result}: {nvrtc.nvrtcGetErrorString(result).decode()}")


def _nvrtc() -> ctypes.CDLL:
    """NVRTC: the one a CUDA build of torch loaded, else from the nvidia wheels beside it."""
    names = ["libnvrtc.so"]
    torch = sys.modules.get("torch")
    cuda_version = getattr(getattr(torch, "version", None), "cuda", None)
    if cuda_version:
        names.insert(0, f"libnvrtc.so.{cuda_version.split('.')[0]}")
    for base in sys.path:
        names += sorted(glob.glob(os.path.join(base, "nvidia", "*", "lib", "libnvrtc.so*")))
    for name in names:
        try:
            beside = (
                sorted(glob.glob(os.path.join(os.path.dirname(name), "libnvrtc-builtins.so*")))
                if os.path.isabs(name)
                else []
            )
            for builtins in beside:
                # NVRTC opens its builtins by name: one found beside it is loaded first
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("NVRTC (libnvrtc) is not loadable")
