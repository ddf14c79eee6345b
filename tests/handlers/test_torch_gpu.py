"""CUDA paths of the torch handlers (run on a GPU host; skipped here with the reason shown)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from handlers.registry import check_compatible, detect, handler_class
from serving.errors import InsufficientMemory, ServingError
from serving.types import Device, ModelConfig

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU and a CUDA build of torch"),
]


def loaded(path, config=ModelConfig(), device=Device("cuda", 0)):
    art = detect(path.parent, model_file=path.name)
    check_compatible(art, ["cpu", "cuda:0"])
    handler = handler_class(art.handler)()
    handler.load(art, device, config)
    return handler


def submit_from_threads(batcher, xs: list) -> list:
    """Each of ``xs`` submitted as one request from 8 threads, some waiting for their answer
    before the next (closed-loop callers among open-loop ones: batches of every size)."""
    import threading
    import time

    futures = [None] * len(xs)

    def submit(start):
        for i in range(start, len(xs), 8):
            futures[i] = batcher.submit({"x": xs[i]}, time.time() + 60)
            if i % 5 == 0:
                futures[i].result(60)

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return futures


def check_answers(batcher, model, xs: list, futures: list) -> None:
    """Each request's answer is the CPU model's for its own input; the batcher is closed after."""
    try:
        for x, future in zip(xs, futures, strict=True):
            np.testing.assert_allclose(future.result(60)["output"], cpu_reference(model, x), atol=2e-3)
    finally:
        batcher.close()


def cpu_reference(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("name", ["traced.pt", "dynamic.pt2", "static.pt2"])
def test_cuda_predictions_match_cpu(torch_artifacts, name):
    src, model = torch_artifacts
    handler = loaded(src / name)
    x = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)
    out = handler.predict({"x": x})["output"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, cpu_reference(model, x), rtol=1e-3, atol=1e-4)
    handler.unload()


def test_fp16_on_cuda_is_close_and_returns_float32(torch_artifacts):
    src, model = torch_artifacts
    handler = loaded(src / "traced.pt", ModelConfig(precision="fp16"))
    x = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    out = handler.predict({"x": x})["output"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, cpu_reference(model, x), atol=2e-2)


def test_cuda_graphs_replay_matches_eager(torch_artifacts):
    src, model = torch_artifacts
    handler = loaded(src / "static.pt2", ModelConfig(cuda_graphs=True))
    for seed in (0, 1, 2):  # first call captures, later calls replay with new data
        x = np.random.default_rng(seed).standard_normal((2, 4)).astype(np.float32)
        np.testing.assert_allclose(
            handler.predict({"x": x})["output"], cpu_reference(model, x), rtol=1e-3, atol=1e-4
        )
    assert handler.runner._captured == {(((2, 4), "<f4"),)}


def test_graphs_of_several_sizes_share_a_pool_and_each_replays_its_own_answer(torch_artifacts):
    # one lane's graphs share a memory pool: a later replay may reuse an earlier graph's scratch
    # memory, which is safe only because each answer is copied out before the next replay
    src, model = torch_artifacts
    handler = loaded(src / "dynamic.pt2", ModelConfig(cuda_graphs=True, batch_sizes=(1, 2, 4)))
    rng = np.random.default_rng(5)
    for size in (4, 1, 2, 4, 2, 1, 1, 4):
        x = rng.standard_normal((size, 4)).astype(np.float32)
        np.testing.assert_allclose(
            handler.predict({"x": x})["output"], cpu_reference(model, x), rtol=1e-3, atol=1e-4
        )
    assert {key[0][0][0] for key in handler.runner._captured} == {1, 2, 4}


class Deep(torch.nn.Module):
    """``layers`` tanh(x @ w) of ``width``: a batch long enough on the GPU for early reads to show."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(width, width) / (width**0.5))
        self.layers = layers

    def forward(self, x):
        for _ in range(self.layers):
            x = torch.tanh(x @ self.w)
        return x


@pytest.mark.parametrize("sync", ["spin", "block", "auto"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_every_cuda_sync_waits_for_the_whole_batch(tmp_path, sync, graphs):
    # long enough on the device that reading the pinned output before the copy lands would show
    model = Deep(1024, 30).eval()
    torch.jit.script(model).save(str(tmp_path / "deep.pt"))
    config = ModelConfig(cuda_sync=sync, cuda_graphs=graphs, batch_sizes=(1, 256) if graphs else ())
    handler = loaded(tmp_path / "deep.pt", config)
    rng = np.random.default_rng(7)
    for rows in (256, 1, 256):  # auto sleeps on an event for 256 rows and spins for one
        x = rng.standard_normal((rows, 1024)).astype(np.float32)
        np.testing.assert_allclose(handler.predict({"x": x})["output"], cpu_reference(model, x), atol=2e-3)
    handler.unload()


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_two_lanes_run_batches_at_once_and_never_mix_them(torch_artifacts, graphs):
    # concurrent_batches = 2: each batch in flight has its own stream, pinned staging and graphs;
    # with one shared staging buffer, a second batch would overwrite the first's input mid-copy
    from concurrent.futures import ThreadPoolExecutor

    src, model = torch_artifacts
    handler = loaded(src / "static.pt2", ModelConfig(cuda_graphs=graphs, concurrent_batches=2))
    assert handler.concurrent_batches == 2
    xs = [np.random.default_rng(seed).standard_normal((2, 4)).astype(np.float32) for seed in range(200)]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda x: handler.predict({"x": x})["output"], xs))
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out, cpu_reference(model, x), rtol=1e-3, atol=1e-4)
    lanes = [handler.runner._lanes.get() for _ in range(2)]
    assert lanes[0].stream is not None and lanes[0].stream != lanes[1].stream
    assert [len(lane.graphs) for lane in lanes] == ([1, 1] if graphs else [0, 0])


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_a_pipelined_batcher_on_cuda_gives_every_request_its_own_answer(tmp_path, graphs, depth):
    # the host's path on a GPU: batch N+1 is assembled in the lane's pinned staging buffer and
    # launched before batch N's answers are handed out (with depth 2, while N still runs: in
    # the twin lane's staging), so a graph's outputs or a staging buffer reused too early
    # would mix requests up
    from serving.batching import Batcher, BatchPolicy

    model = Deep(256, 20).eval()
    torch.jit.script(model).save(str(tmp_path / "deep.pt"))
    sizes = (1, 2, 4, 8, 16, 32)
    config = ModelConfig(cuda_graphs=graphs, batch_sizes=sizes if graphs else (), pipeline_depth=depth)
    handler = loaded(tmp_path / "deep.pt", config)
    assert handler.pipelined and handler.launch_depth == depth
    assert not loaded(tmp_path / "deep.pt", ModelConfig(pipeline=False)).pipelined
    launches = []

    def launch(inputs):
        launches.append(len(inputs["x"]))
        return handler.launch(inputs)

    policy = BatchPolicy(max_batch_size=32, batch_sizes=sizes if graphs else (), max_queue=4096)
    buffer = handler.input_buffer("x", (8, 256), np.dtype(np.float32))
    assert torch.from_numpy(buffer).is_pinned()  # batches are assembled straight in pinned memory
    batcher = Batcher(handler.predict, policy, launch=launch, allocate=handler.input_buffer, depth=depth)
    xs = [
        np.random.default_rng(seed).standard_normal((1 + seed % 3, 256)).astype(np.float32)
        for seed in range(600)
    ]
    futures = submit_from_threads(batcher, xs)
    check_answers(batcher, model, xs, futures)
    assert len(launches) < len(xs) and max(launches) > 3  # requests were batched together
    handler.unload()


def test_out_of_memory_is_507_and_the_handler_keeps_serving(torch_artifacts):
    src, model = torch_artifacts
    handler = loaded(src / "dynamic.pt2")
    free, _ = torch.cuda.mem_get_info()
    real = handler.runner.fn
    handler.runner.fn = lambda x: torch.empty(
        free // 2, dtype=torch.float32, device=x.device
    )  # 2x free bytes
    with pytest.raises(InsufficientMemory):
        handler.predict({"x": np.ones((2, 4), np.float32)})
    handler.runner.fn = real
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(
        handler.predict({"x": x})["output"], cpu_reference(model, x), rtol=1e-3, atol=1e-4
    )


@pytest.fixture(scope="module")
def cuda_aoti_package(tmp_path_factory, torch_artifacts):
    _, model = torch_artifacts
    path = tmp_path_factory.mktemp("aoti_cuda") / "model.pt2"
    example = (torch.randn(2, 4, device="cuda"),)
    torch._inductor.aoti_compile_and_package(
        torch.export.export(model.to("cuda"), example), package_path=str(path)
    )
    model.to("cpu")
    return path


@pytest.mark.slow
def test_cuda_aoti_package_predicts_like_cpu(cuda_aoti_package, torch_artifacts):
    _, model = torch_artifacts
    assert detect(cuda_aoti_package.parent).devices == ("cuda",)
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    np.save(cuda_aoti_package.parent / "x.npy", x)
    # In a child process: a wrapper built with a static libstdc++ (the lent image's default $CXX)
    # crashed the interpreter at load; the handler now refuses one (run with CXX=/usr/bin/g++ there).
    code = (
        "import sys, numpy as np; from pathlib import Path; from handlers.registry import detect, handler_class\n"
        "from serving.types import Device, ModelConfig\n"
        "d = Path(sys.argv[1]); art = detect(d, model_file='model.pt2'); h = handler_class(art.handler)()\n"
        "h.load(art, Device('cuda', 0), ModelConfig())\n"
        "np.save(d / 'y.npy', h.predict({'input': np.load(d / 'x.npy')})['output'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(cuda_aoti_package.parent)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    np.testing.assert_allclose(
        np.load(cuda_aoti_package.parent / "y.npy"), cpu_reference(model, x), rtol=1e-3, atol=1e-4
    )


@pytest.fixture(scope="module")
def cuda_aoti_dynamic(tmp_path_factory, torch_artifacts):
    """A CUDA AOTInductor package for any batch of 1 to 8 rows."""
    _, model = torch_artifacts
    path = tmp_path_factory.mktemp("aoti_cuda_dynamic") / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(
        model.to("cuda"), (torch.randn(2, 4, device="cuda"),), dynamic_shapes=({0: batch},)
    )
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    model.to("cpu")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_two_launches_in_flight_on_one_stream_each_get_their_own_answer(tmp_path, graphs):
    # pipeline_depth 2: the second batch is launched before the first is collected, of the same
    # size (the same graph), built in the staging the runner hands out for it; long enough on
    # the device that an overwritten input, graph output or early read would show
    model = Deep(1024, 30).eval()
    torch.jit.script(model).save(str(tmp_path / "deep.pt"))
    handler = loaded(
        tmp_path / "deep.pt",
        ModelConfig(cuda_graphs=graphs, batch_sizes=(64,) if graphs else (), pipeline_depth=2),
    )
    assert handler.launch_depth == 2
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((64, 1024)).astype(np.float32) for _ in range(8)]
    staged, outputs = [], []
    collect = None
    for x in xs:
        buffer = handler.input_buffer("x", x.shape, x.dtype)
        assert all(buffer.ctypes.data != other for other in staged[-1:])  # never the one in flight
        staged.append(buffer.ctypes.data)
        np.copyto(buffer, x)
        launched = handler.launch({"x": buffer})  # while the last one may still run
        if collect is not None:
            outputs.append(collect()["output"])
        collect = launched
    outputs.append(collect()["output"])
    for x, out in zip(xs, outputs, strict=True):
        np.testing.assert_allclose(out, cpu_reference(model, x), atol=2e-3)
    assert len(set(staged)) == 2  # two staging buffers, taken in turn
    handler.unload()


def test_cuda_aoti_graphs_replay_each_size_its_own_answer(cuda_aoti_dynamic, torch_artifacts):
    # the runtime is loaded without its thread synchronisation, which is what lets it be captured
    _, model = torch_artifacts
    handler = loaded(cuda_aoti_dynamic, ModelConfig(cuda_graphs=True, batch_sizes=(1, 2, 4, 8)))
    rng = np.random.default_rng(11)
    for size in (4, 1, 8, 2, 4, 1, 8, 2):  # first of each size captures, the rest replay
        x = rng.standard_normal((size, 4)).astype(np.float32)
        np.testing.assert_allclose(
            handler.predict({"input": x})["output"], cpu_reference(model, x), rtol=1e-3, atol=1e-4
        )
    assert {key[0][0][0] for key in handler.runner._captured} == {1, 2, 4, 8}
    handler.unload()


@pytest.mark.slow
def test_cuda_aoti_graphs_in_two_lanes_never_mix_batches(cuda_aoti_dynamic, torch_artifacts):
    from concurrent.futures import ThreadPoolExecutor

    _, model = torch_artifacts
    config = ModelConfig(cuda_graphs=True, batch_sizes=(2, 4), concurrent_batches=2)
    handler = loaded(cuda_aoti_dynamic, config)
    xs = [
        np.random.default_rng(seed).standard_normal((2 + 2 * (seed % 2), 4)).astype(np.float32)
        for seed in range(200)
    ]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda x: handler.predict({"input": x})["output"], xs))
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out, cpu_reference(model, x), rtol=1e-3, atol=1e-4)
    lanes = [handler.runner._lanes.get() for _ in range(2)]
    assert [len(lane.graphs) for lane in lanes] == [2, 2]


@pytest.mark.slow
def test_cuda_aoti_graphs_need_batch_sizes_for_a_dynamic_package(cuda_aoti_dynamic):
    from serving.errors import ConfigError

    with pytest.raises(ConfigError, match="needs batch_sizes"):
        loaded(cuda_aoti_dynamic, ModelConfig(cuda_graphs=True))


@pytest.mark.slow
def test_cuda_aoti_package_is_refused_on_cpu(cuda_aoti_package):
    art = detect(cuda_aoti_package.parent)
    with pytest.raises(ServingError, match="runs only on cuda"):
        check_compatible(art, ["cpu"])
    with pytest.raises(ServingError, match="compiled for cuda; it cannot run on cpu"):
        handler_class("torch_aoti")().load(art, Device("cpu"), ModelConfig())


@pytest.mark.slow
def test_cpu_aoti_package_is_refused_on_cuda(aoti_package):
    with pytest.raises(ServingError, match="compiled for cpu; it cannot run on cuda:0"):
        handler_class("torch_aoti")().load(detect(aoti_package.parent), Device("cuda", 0), ModelConfig())
