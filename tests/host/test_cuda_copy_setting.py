"""A CUDA host sets how its runners queue copies to the device from ONEBOX_CUDA_COPY."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from handlers.cuda_driver import DRIVER
from handlers.cuda_gather import GATHER
from serving.host.process import _cuda_copies
from serving.settings import Settings


@pytest.fixture
def restore():
    was = DRIVER.enabled, GATHER.enabled
    yield
    DRIVER.enabled, GATHER.enabled = was


@pytest.mark.parametrize(
    "value,enabled,gathered", [("driver", True, False), ("torch", False, False), ("zerocopy", True, True)]
)
def test_a_cuda_host_turns_the_driver_path_and_the_gather_on_or_off(restore, value, enabled, gathered):
    DRIVER.enabled, GATHER.enabled = not enabled, not gathered
    settings = Settings.from_env({"ONEBOX_CUDA_COPY": value})
    _cuda_copies(SimpleNamespace(device=SimpleNamespace(kind="cuda", index=0), settings=settings))
    assert DRIVER.enabled is enabled
    assert GATHER.enabled is gathered


def test_a_cpu_host_leaves_it_alone(restore):
    DRIVER.enabled = True
    settings = Settings.from_env({"ONEBOX_CUDA_COPY": "torch"})
    _cuda_copies(SimpleNamespace(device=SimpleNamespace(kind="cpu", index=None), settings=settings))
    assert DRIVER.enabled is True
