"""One model host per GPU (device discovery without a framework) and least-loaded routing."""

from __future__ import annotations

import sys
import types

import pytest

from serving.errors import ConfigError
from serving.host import devices
from serving.http.routing import HostRouter
from serving.launcher import plan_hosts
from serving.settings import Settings
from tests.support import models


class _FakeNvml(types.ModuleType):
    class NVMLError(Exception):
        pass

    def __init__(self, count: int):
        super().__init__("pynvml")
        self.count = count

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return self.count


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(4))


def test_nvml_gpus_honour_cuda_visible_devices(four_gpus):
    assert devices.nvidia_gpus(None) == [0, 1, 2, 3]
    assert devices.nvidia_gpus("2,0") == [2, 0]
    assert devices.nvidia_gpus("") == []


def test_no_nvml_means_no_gpus(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if nvidia-ml-py were absent
    assert devices.nvidia_gpus(None) == []


def test_a_cuda_capable_model_gets_one_host_per_gpu(tmp_path, four_gpus):
    model_dir = models.onnx_model(tmp_path / "m")
    specs = plan_hosts(Settings.from_env({"CUDA_VISIBLE_DEVICES": "1,3"}), model_dir, tmp_path)
    assert [(s.name, s.device, s.env["CUDA_VISIBLE_DEVICES"]) for s in specs] == [
        ("cuda1", "cuda:0", "1"),
        ("cuda3", "cuda:0", "3"),
    ]
    assert len({s.socket for s in specs}) == 2


def test_onebox_device_cpu_keeps_the_model_on_the_cpu(tmp_path, four_gpus):
    model_dir = models.onnx_model(tmp_path / "m")
    specs = plan_hosts(Settings.from_env({"ONEBOX_DEVICE": "cpu"}), model_dir, tmp_path)
    assert [(s.name, s.device) for s in specs] == [("cpu", "cpu")]


def test_onebox_toml_device_cpu_keeps_the_model_on_the_cpu(tmp_path, four_gpus):
    model_dir = models.onnx_model(tmp_path / "m")
    (model_dir / "onebox.toml").write_text('device = "cpu"\n')
    specs = plan_hosts(Settings.from_env({}), model_dir, tmp_path)
    assert [s.device for s in specs] == ["cpu"]


def test_asking_for_cuda_without_a_gpu_is_a_start_up_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(0))
    with pytest.raises(ConfigError, match="no NVIDIA GPU"):
        plan_hosts(Settings.from_env({"ONEBOX_DEVICE": "cuda"}), models.onnx_model(tmp_path / "m"), tmp_path)


def test_requests_go_to_the_host_with_the_fewest_calls_in_flight():
    router = HostRouter([{"name": f"cuda{i}", "socket": f"/nonexistent/{i}.sock"} for i in range(3)])
    for client, outstanding in zip(router.clients, (4, 1, 2), strict=True):
        client._outstanding = outstanding
    assert router.pick().name == "cuda1"
    assert router.pick(exclude=router.clients[1]).name == "cuda2"


def test_several_hosts_per_gpu_each_get_their_own_socket(tmp_path, four_gpus):
    model_dir = models.onnx_model(tmp_path / "m")
    settings = Settings.from_env({"CUDA_VISIBLE_DEVICES": "0,2", "ONEBOX_HOSTS_PER_DEVICE": "2"})
    specs = plan_hosts(settings, model_dir, tmp_path)
    assert [(s.name, s.env["CUDA_VISIBLE_DEVICES"]) for s in specs] == [
        ("cuda0-0", "0"),
        ("cuda0-1", "0"),
        ("cuda2-0", "2"),
        ("cuda2-1", "2"),
    ]
    assert len({s.socket for s in specs}) == 4
