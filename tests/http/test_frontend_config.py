"""The embedded gunicorn's configuration (serving.http.server): what it is given from Settings."""

from __future__ import annotations

import dataclasses
import gc

import pytest

from serving.http.server import FrontendApplication
from serving.settings import Settings


@pytest.mark.parametrize("freeze", [True, False])
def test_workers_freeze_their_heap_after_loading_the_app_only_when_asked(freeze):
    settings = dataclasses.replace(Settings.from_env({}), gc_freeze=freeze)
    app = FrontendApplication(settings, [])
    gc.unfreeze()
    try:
        app.cfg.post_worker_init(object())  # gunicorn calls it with the worker, its app loaded
        assert (gc.get_freeze_count() > 0) is freeze
    finally:
        gc.unfreeze()


def test_onebox_gc_freeze_is_on_unless_turned_off():
    assert Settings.from_env({}).gc_freeze is True
    assert Settings.from_env({"ONEBOX_GC_FREEZE": "false"}).gc_freeze is False
