"""A CUDA host sets how its runners queue copies to the device from ONEBOX_CUDA_COPY."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from handlers.cuda_driver import DRIVER
from serving.host.process import _cuda_copies
from serving.settings import Settings


@pytest.fixture
def restore():
    was = DRIVER.enabled, DRIVER.device_index
    yield
    DRIVER.enabled, DRIVER.device_index = was


@pytest.mark.parametrize("value,enabled", [("driver", True), ("torch", False)])
def test_a_cuda_host_turns_the_driver_path_on_or_off(restore, value, enabled):
    DRIVER.enabled = not enabled
    settings = Settings.from_env({"ONEBOX_CUDA_COPY": value})
    _cuda_copies(SimpleNamespace(device=SimpleNamespace(kind="cuda", index=3), settings=settings))
    assert DRIVER.enabled is enabled
    assert DRIVER.device_index == 3  # a thread without a context gets the host's own device's


def test_a_cpu_host_leaves_it_alone(restore):
    DRIVER.enabled = True
    settings = Settings.from_env({"ONEBOX_CUDA_COPY": "torch"})
    _cuda_copies(SimpleNamespace(device=SimpleNamespace(kind="cpu", index=None), settings=settings))
    assert DRIVER.enabled is True
