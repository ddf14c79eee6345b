"""A model host whose batcher pipelines, over real IPC: every client gets the answer to its own image.

The model stands in for a GPU runner: ``launch`` takes the batch in the buffer ``input_buffer``
handed out (one per shape, reused by every batch, as the pinned staging buffers are) and computes
only when the batch is collected. So a next batch built in that buffer before the last one was
collected, or a request's shared-memory image read after its answer went out, would give some
client the answer to another client's image.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from serving.batching import Batcher, BatchPolicy
from serving.host.process import Host
from serving.host.registry import Model, State
from serving.ipc.client import HostClient
from serving.ipc.server import IPCServer
from serving.settings import Settings
from serving.types import BatchMode, Device, ModelConfig, Signature, TensorSpec

IMAGE = (1, 3, 64, 64)  # 12 KiB of uint8 per image; the clients below also send larger ones


class DeviceLike:
    """A handler stand-in for a CUDA runner: launch now, compute when collected."""

    raw = False

    def __init__(self):
        self.signature = Signature((TensorSpec("x", "uint8", (-1, 3, 64, 64)),), (), BatchMode.DYNAMIC)
        self.staging: dict[tuple, np.ndarray] = {}
        self.launched: list[int] = []

    def input_buffer(self, name, shape, dtype):
        return self.staging.setdefault((name, shape, np.dtype(dtype).str), np.empty(shape, dtype))

    def predict(self, inputs):
        return self.launch(inputs)()

    def unload(self):
        self.staging.clear()

    def launch(self, inputs):
        x = inputs["x"]
        self.launched.append(len(x))

        def collect():
            time.sleep(0.002)  # the device's time, the GIL free
            flat = x.reshape(len(x), -1).astype(np.int64)
            return {"sum": flat.sum(axis=1), "first": flat[:, :4].copy()}

        return collect


@pytest.fixture
def pipelined_host(tmp_path):
    host = Host(Settings.from_env({}), Device("cpu"))
    model = DeviceLike()
    entry = Model("model", Path("/"), state=State.READY, handler=model, config=ModelConfig(max_batch_size=16))
    entry.batcher = Batcher(
        model.predict,
        BatchPolicy(max_batch_size=16, max_queue=1024),
        launch=model.launch,
        allocate=model.input_buffer,
    )
    host.registry._models["model"] = entry
    server = IPCServer(str(tmp_path / "host.sock"), host.dispatch, host.dispatch_nowait)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.path, model
    server.close()
    host.registry.close()


def test_every_client_of_a_pipelined_host_gets_the_answer_to_its_own_image(pipelined_host):
    path, model = pipelined_host
    failures: list[str] = []
    sent: list[int] = []

    def client_loop(seed: int) -> None:
        client = HostClient(path)
        rng = np.random.default_rng(seed)
        try:
            for _ in range(25):
                rows = int(rng.integers(1, 7))  # 12-72 KiB: through the socket and shared memory
                sent.append(rows)
                x = rng.integers(0, 255, (rows, *IMAGE[1:]), dtype=np.uint8)
                out = client.infer("model", {"x": x}, time.time() + 30)
                flat = x.reshape(rows, -1).astype(np.int64)
                if not (
                    np.array_equal(out["sum"], flat.sum(axis=1)) and np.array_equal(out["first"], flat[:, :4])
                ):
                    failures.append(f"client {seed} got another request's answer")
        finally:
            client.close()

    threads = [threading.Thread(target=client_loop, args=(seed,)) for seed in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert sum(model.launched) == sum(sent)  # every row ran exactly once
    assert max(model.launched) > 3  # requests were batched together, in the shared buffers
