"""Batches copied to the GPU part by part, from registered shared regions (run on a GPU host).

On a CUDA host the batcher hands the runner a batch's requests unjoined (Rows); each part that
lies in a region registered with CUDA is copied from there by the copy engine, the others
through pinned staging. These tests put requests in real memfd regions mapped read-only, as the
host maps a frontend's, and check every request still gets its own answer.
"""

from __future__ import annotations

import mmap
import os
import time

import numpy as np
import pytest

from handlers.host_memory import REGIONS, PinnedRegions
from serving.types import ModelConfig, Rows

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU and a CUDA build of torch"),
]

from tests.handlers.test_torch_gpu import Deep, check_answers, cpu_reference, loaded, submit_from_threads  # noqa: E402


def in_region(arrays: list[np.ndarray]) -> tuple[mmap.mmap, list[np.ndarray]]:
    """A memfd holding ``arrays`` (64-byte aligned), mapped read-only, and views of them there."""
    offsets, end = [], 0
    for a in arrays:
        offsets.append(end)
        end += -(-a.nbytes // 64) * 64
    fd = os.memfd_create("test-region")
    try:
        os.ftruncate(fd, max(end, 4096))
        with mmap.mmap(fd, max(end, 4096)) as writer:
            for a, offset in zip(arrays, offsets, strict=True):
                writer[offset : offset + a.nbytes] = a.tobytes()
        region = mmap.mmap(fd, max(end, 4096), prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    views = [
        np.frombuffer(region, a.dtype, a.size, offset).reshape(a.shape)
        for a, offset in zip(arrays, offsets, strict=True)
    ]
    return region, views


@pytest.fixture
def regions():
    torch.cuda.init()
    REGIONS.enable(0)
    retirements = []

    def pin(region):
        retirements.append(REGIONS.pin(region))
        assert REGIONS.flush(10)  # registered on the table's own thread
        return retirements[-1]

    yield pin
    for retire in retirements:
        if retire is not None:
            retire()


def test_a_registered_region_is_page_locked_until_it_is_retired():
    torch.cuda.init()
    table = PinnedRegions()
    table.enable(0)
    region, (view,) = in_region([np.arange(1 << 16, dtype=np.uint8)])
    retire = table.pin(region)
    assert retire is not None and table.flush(10)
    assert table.failures == 0, "the driver refused to register a read-only shared mapping"
    assert torch.from_numpy(view).is_pinned()
    with table.holding() as covers:
        assert covers(view)
    retire()
    deadline = time.time() + 10
    while torch.from_numpy(view).is_pinned() and time.time() < deadline:
        time.sleep(0.01)
    assert not torch.from_numpy(view).is_pinned()
    with table.holding() as covers:
        assert not covers(view)


@pytest.fixture(params=["driver", "torch"])
def copies(request):
    """Copies to the device queued by the driver (the default) or by ``Tensor.copy_``."""
    from handlers.cuda_driver import DRIVER

    was = DRIVER.enabled
    DRIVER.enabled = request.param == "driver"
    yield request.param, DRIVER
    DRIVER.enabled = was


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_rows_from_registered_and_plain_memory_give_the_joined_batch_answers(
    tmp_path, regions, graphs, copies
):
    way, driver = copies
    queued, launched = driver.queued, driver.launched
    model = Deep(64, 4).eval()
    torch.jit.script(model).save(str(tmp_path / "deep.pt"))
    config = ModelConfig(cuda_graphs=graphs, batch_sizes=(8,) if graphs else ())
    handler = loaded(tmp_path / "deep.pt", config)
    assert handler.takes_rows
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 64)).astype(np.float32) for n in (2, 1, 3)]
    region, views = in_region(xs[:2])
    assert regions(region) is not None
    for parts in ([views[0], views[1], xs[2]], [xs[2], views[1]], [views[0]], [xs[0], xs[1]]):
        rows = sum(len(p) for p in parts)
        batch = Rows(parts, 8 if graphs else rows)  # padded up to the captured size
        out = handler.launch({"x": batch})()["output"]
        joined = np.concatenate(parts)
        assert out.shape[0] == len(batch)
        np.testing.assert_allclose(out[:rows], cpu_reference(model, joined), atol=2e-3)
        # padding repeats the last real row
        np.testing.assert_allclose(
            out[rows:], np.repeat(out[rows - 1 : rows], len(batch) - rows, 0), atol=1e-5
        )
    # the driver took the copies (none failed: a failure turns it off), or torch did them all
    assert driver.enabled == (way == "driver")
    assert (driver.queued > queued) == (way == "driver")
    # the driver also recorded the batches' events (and launched the graphs)
    assert (driver.launched > launched) == (way == "driver")
    handler.unload()


def test_a_graph_that_draws_random_numbers_is_replayed_by_torch_never_by_the_driver(copies):
    # torch's replay moves the generator's offset on before each launch; launched by the driver
    # such a graph would draw the same numbers every time
    from handlers.cuda_graphs import capture_graph, launch_handle

    device = torch.device("cuda", 0)
    x = torch.ones(4, 8, device=device)
    noisy, _ = capture_graph(lambda t: t + torch.rand_like(t), [x], device)
    plain, out = capture_graph(lambda t: t * 2, [x], device)
    assert launch_handle(noisy, device) == 0
    handle = launch_handle(plain, device)
    assert handle != 0
    _, driver = copies
    if driver.enabled:  # the handle launches the graph: its output is the model's
        out.zero_()
        stream = torch.cuda.current_stream(device)
        assert driver.launch_graph(handle, stream.cuda_stream)
        stream.synchronize()
        torch.testing.assert_close(out, x * 2)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_a_gathering_batcher_on_cuda_gives_every_request_its_own_answer(tmp_path, regions, graphs, depth):
    # as the host runs on a GPU: requests arrive in registered regions (every other one in plain
    # memory), batch N+1's copies run on a copy stream while N computes (depth 2: in the twin
    # lane), so a device buffer or graph input reused too early would mix requests up
    from serving.batching import Batcher, BatchPolicy

    model = Deep(256, 20).eval()
    torch.jit.script(model).save(str(tmp_path / "deep.pt"))
    sizes = (1, 2, 4, 8, 16, 32)
    config = ModelConfig(cuda_graphs=graphs, batch_sizes=sizes if graphs else (), pipeline_depth=depth)
    handler = loaded(tmp_path / "deep.pt", config)
    launches = []

    def launch(inputs):
        launches.append(type(inputs["x"]).__name__)
        return handler.launch(inputs)

    policy = BatchPolicy(max_batch_size=32, batch_sizes=sizes if graphs else (), max_queue=4096)
    batcher = Batcher(handler.predict, policy, launch=launch, depth=depth, gather=handler.takes_rows)
    plain = [
        np.random.default_rng(seed).standard_normal((1 + seed % 3, 256)).astype(np.float32)
        for seed in range(600)
    ]
    region, views = in_region(plain[::2])
    assert regions(region) is not None
    xs = [views[i // 2] if i % 2 == 0 else x for i, x in enumerate(plain)]
    futures = submit_from_threads(batcher, xs)
    check_answers(batcher, model, plain, futures)
    assert "Rows" in launches and len(launches) < len(xs)  # batched, and handed over unjoined
    handler.unload()


def test_the_gather_kernel_copies_aligned_and_unaligned_segments_from_host_memory(regions):
    # benchmarks/gather_kernel.py (timed by gpu_copy_calls.py): what it reads is a registered
    # read-only region and torch's pinned memory, at their host addresses; 16-byte loads where
    # a segment allows them, bytes elsewhere
    from benchmarks.gather_kernel import MAX_SEGMENTS, GatherKernel

    kernel = GatherKernel(0)
    torch.cuda.synchronize()  # this thread's context current, as a launching thread's is
    why = kernel.load()
    assert why is None, why
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    region, (view,) = in_region([data])
    assert regions(region) is not None
    pinned = torch.from_numpy(rng.integers(0, 256, 1 << 16, dtype=np.uint8)).pin_memory()
    out = torch.zeros(3 << 20, dtype=torch.uint8, device="cuda")
    base = out.data_ptr()
    segments = [
        (base, view.ctypes.data, 1 << 20),  # aligned, a whole region
        (base + (1 << 20), pinned.data_ptr(), 1 << 16),  # aligned, pinned memory
        (base + (1 << 20) + (1 << 16) + 3, view.ctypes.data + 5, 1001),  # unaligned
    ] + [(base + (2 << 20) + 48 * i, view.ctypes.data + 16 * i, 48) for i in range(MAX_SEGMENTS - 3)]
    stream = torch.cuda.current_stream()
    assert kernel.launch(segments, stream.cuda_stream) == 0
    stream.synchronize()
    expected = np.zeros(3 << 20, np.uint8)
    for target, source, nbytes in segments:
        at = target - base
        if source == pinned.data_ptr():
            expected[at : at + nbytes] = pinned.numpy()[:nbytes]
        else:
            offset = source - view.ctypes.data
            expected[at : at + nbytes] = data[offset : offset + nbytes]
    np.testing.assert_array_equal(out.cpu().numpy(), expected)


def test_the_driver_queues_from_a_thread_that_never_used_the_device():
    # as a batcher thread whose first CUDA work is a driver copy: the runtime never made the
    # device's context current there, and the driver path used to turn itself off for good
    import threading

    from handlers.cuda_driver import CudaDriver

    driver = CudaDriver.load()
    assert driver is not None
    source = torch.arange(1024, dtype=torch.float32).pin_memory()
    target = torch.zeros(1024, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    results = []
    thread = threading.Thread(
        target=lambda: results.append(
            driver.host_to_device(target.data_ptr(), source.data_ptr(), source.nbytes, stream)
        )
    )
    thread.start()
    thread.join()
    torch.cuda.synchronize()
    assert results == [True] and driver.enabled
    torch.testing.assert_close(target.cpu(), source)
