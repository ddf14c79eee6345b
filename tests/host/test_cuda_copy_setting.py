"""A CUDA host sets how its runners queue copies to the device from ONEBOX_CUDA_COPY."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from handlers.cuda_driver import DRIVER
from serving.host.process import _cuda_copies
from serving.settings import Settings


@pytest.fixture
def restore():
    was = DRIVER.enabled, DRIVER.gather, DRIVER.device_index
    yield
    DRIVER.enabled, DRIVER.gather, DRIVER.device_index = was


@pytest.mark.parametrize(
    "value,enabled,gather", [("driver", True, False), ("gather", True, True), ("torch", False, False)]
)
def test_a_cuda_host_turns_the_driver_path_and_its_gather_on_or_off(restore, value, enabled, gather):
    DRIVER.enabled, DRIVER.gather = not enabled, not gather
    settings = Settings.from_env({"ONEBOX_CUDA_COPY": value})
    _cuda_copies(SimpleNamespace(device=SimpleNamespace(kind="cuda", index=3), settings=settings))
    assert DRIVER.enabled is enabled and DRIVER.gather is gather
    assert DRIVER.device_index == 3  # the kernel is loaded for the host's own device


def test_a_cpu_host_leaves_it_alone(restore):
    DRIVER.enabled = True
    settings = Settings.from_env({"ONEBOX_CUDA_COPY": "torch"})
    _cuda_copies(SimpleNamespace(device=SimpleNamespace(kind="cpu", index=None), settings=settings))
    assert DRIVER.enabled is True
