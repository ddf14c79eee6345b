"""CUDA graphs: captured once per batch shape, then launched, copied out and marked done.

The launch, the copies out and the event records go through the driver where they can
(handlers.cuda_driver), else through torch.
"""

from __future__ import annotations

from collections.abc import Callable

from handlers.cuda_driver import DRIVER
from handlers.cuda_inputs import Lane
from handlers.host_memory import REGIONS


def capture_graph(fn: Callable, static_in: list, device, pool=None) -> tuple:
    """``(graph, outputs)``: ``fn(*static_in)`` warmed up on a side stream, then captured once.

    Replaying the graph reruns ``fn`` on whatever ``static_in`` then holds, into ``outputs``.
    ``pool``: share another graph's memory pool (safe for graphs never replayed at once whose
    outputs are read before the next replay: a later replay may overwrite an earlier one's).
    """
    import torch

    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*static_in)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # no shared region is registered or retired meanwhile (calls a capture forbids); and calls
    # another thread makes (another model's) do not invalidate this capture: thread_local
    with REGIONS.capturing(), torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = fn(*static_in)
    return graph, out


def launch_handle(graph, device) -> int:
    """The captured graph's ``cudaGraphExec_t``, for launching it through the driver; 0 where
    only torch's ``replay`` is right.

    ``replay`` also moves the CUDA generator's offset on by what one run of the graph draws, so
    a graph that draws random numbers keeps it: one replay here shows whether the offset moves.
    0 too for a torch without ``raw_cuda_graph_exec``.
    """
    import torch

    raw = getattr(graph, "raw_cuda_graph_exec", None)
    if raw is None:
        return 0
    generator = torch.cuda.default_generators[device.index or 0]
    before = generator.get_offset()
    graph.replay()
    torch.cuda.synchronize(device)
    return raw() if generator.get_offset() == before else 0


def copied_out(lane: Lane, key: tuple, outs: list, stream) -> list:
    """A graph's outputs queued for copying to the host: with the driver path on, into the
    lane's pinned buffers for ``key`` (made once), by the driver where it can (a contiguous
    output), else by ``Tensor.copy_``; with it off, into new pinned tensors (``Tensor.to``).

    The buffers are reused by the lane's next batch of that key, which the lane runs only after
    this one was collected (and its outputs copied out of them: ``_to_numpy``).
    """
    import torch

    if not DRIVER.can("dtoh"):
        return [t.to("cpu", non_blocking=True) for t in outs]
    buffers = lane.outputs.get(key)
    if buffers is None:
        buffers = lane.outputs[key] = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in outs]
    for buffer, out in zip(buffers, outs, strict=True):
        nbytes = out.numel() * out.element_size()
        if not (
            out.is_contiguous()
            and DRIVER.device_to_host(buffer.data_ptr(), out.data_ptr(), nbytes, stream.cuda_stream)
        ):
            buffer.copy_(out, non_blocking=True)
    return buffers
