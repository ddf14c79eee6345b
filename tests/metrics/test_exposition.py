"""Several processes writing into one multiprocess directory, read back as one scrape."""

from __future__ import annotations

import subprocess
import sys
import types

from prometheus_client.parser import text_string_to_metric_families

from serving.metrics.exposition import mark_dead, prepare_directory, scrape
from serving.metrics.process import GpuCollector
from tests.support.server import REPO

WORKER = """
import sys
from serving.metrics.tally import Tally
from serving.metrics import families
tally = Tally()
for _ in range(int(sys.argv[1])):
    tally.record("m", 200, 0.002, 0.001)
tally.record("m", 415, 0.0001, None)
tally.record("gone", 404, 0.0001, None)
tally.flush()
families.RESIDENT_BYTES.labels("frontend", "").set(1000)
print(__import__("os").getpid())
"""


def _values(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _worker(directory, count: int) -> int:
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", WORKER, str(count)], env=env, cwd=REPO, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return int(done.stdout)


def test_a_scrape_sums_every_process_and_forgets_the_gauges_of_dead_ones(tmp_path):
    prepare_directory(tmp_path)
    first, second = _worker(tmp_path, 3), _worker(tmp_path, 4)
    values = _values(scrape(tmp_path)[0].decode())
    assert values[("onebox_requests_total", (("model", "m"), ("status", "200")))] == 7
    assert values[("onebox_requests_total", (("model", "m"), ("status", "415")))] == 2
    # a 404 is counted under one label, whatever model name the client made up
    assert values[("onebox_requests_total", (("model", "-"), ("status", "404")))] == 2
    assert values[("onebox_request_duration_seconds_count", (("model", "m"), ("status", "200")))] == 7
    assert values[("onebox_request_model_seconds_count", (("model", "m"),))] == 7
    assert values[("onebox_request_overhead_seconds_count", (("model", "m"),))] == 9
    memory = ("onebox_process_resident_memory_bytes", (("device", ""), ("role", "frontend")))
    assert values[memory] == 2000

    mark_dead(first, tmp_path)
    values = _values(scrape(tmp_path)[0].decode())
    assert values[memory] == 1000  # only the live one's
    assert values[("onebox_requests_total", (("model", "m"), ("status", "200")))] == 7  # counters stay
    assert second != first


def test_a_new_start_wipes_what_the_last_one_counted(tmp_path):
    prepare_directory(tmp_path)
    _worker(tmp_path, 3)
    (tmp_path / "keep.txt").write_text("not ours")
    prepare_directory(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    assert "onebox_requests_total" not in scrape(tmp_path)[0].decode()


class _FakeNvml(types.SimpleNamespace):
    def __init__(self, count: int):
        super().__init__()
        self.count = count

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUtilizationRates(self, handle):
        return types.SimpleNamespace(gpu=40 + handle)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=1 << 30, total=80 << 30)


def test_gpus_are_reported_through_nvml_when_there_are_some():
    families = {f.name: f for f in GpuCollector(_FakeNvml(2)).collect()}
    util = families["onebox_gpu_utilization_percent"]
    assert [(s.labels["device"], s.value) for s in util.samples] == [("cuda0", 40), ("cuda1", 41)]
    assert families["onebox_gpu_memory_total_bytes"].samples[1].value == 80 << 30
    assert GpuCollector(_FakeNvml(0)).collect() == []  # a driver without GPUs: no series


def test_no_nvml_means_no_gpu_series(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert GpuCollector().collect() == []
