"""A served model host freezes what it holds once its model is loaded (serving.heap), unless
ONEBOX_GC_FREEZE=false: read through the host's ``stats`` op over its real socket."""

from __future__ import annotations

import time

import pytest

from serving.ipc.client import HostClient
from serving.ipc.directory import read_hosts_file
from tests.support import models
from tests.support.server import Server

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("freeze", ["true", "false"])
def test_a_served_host_freezes_its_heap_once_its_model_is_loaded(tmp_path, freeze):
    pytest.importorskip("onnxruntime")
    model_dir = models.onnx_model(tmp_path / "onnx")
    run_dir = tmp_path / "run"
    env = {"ONEBOX_RUN_DIR": str(run_dir), "ONEBOX_GC_FREEZE": freeze}
    with Server(model_dir, workers=1, threads=2, env=env) as srv:
        assert srv.post_json([[1.0, 2.0, 3.0, 4.0]]).status == 200
        hosts = read_hosts_file(run_dir)
        assert hosts
        for entry in hosts:
            client = HostClient(entry["socket"])
            try:
                census = client.stats(time.time() + 5)["gc"]
            finally:
                client.close()
            assert (census["frozen"] > 0) is (freeze == "true"), census
