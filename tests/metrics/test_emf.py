"""CloudWatch EMF lines: valid per contract §6.2, per interval by default, per invocation on request."""

from __future__ import annotations

from serving.metrics.emf import SAMPLES, EmfWriter, document
from tests.support.emf import validate


class Clock:
    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _writer(interval: float):
    lines: list[bytes] = []
    clock = Clock()
    return EmfWriter("onebox", interval, lines.append, clock), lines, clock


def test_an_interval_gives_one_valid_line_per_model_with_its_sums():
    emf, lines, clock = _writer(60)
    for _ in range(5):
        emf.record("a", 200, 0.003, 0.002)
    emf.record("a", 415, 0.0001, None)
    emf.record("a", 500, 0.01, 0.009)
    emf.record("b", 200, 0.004, 0.001)
    emf.flush_if_due()
    assert lines == []  # the interval is not over
    clock.now += 60
    emf.flush_if_due()
    docs = {d["ModelName"]: d for d in (validate(line.decode()) for line in lines)}
    assert len(lines) == 2 and all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    a = docs["a"]
    assert (a["Invocations"], a["Invocation4XXErrors"], a["Invocation5XXErrors"]) == (7, 1, 1)
    assert sorted(a["ModelLatency"]) == [2000] * 5 + [9000]  # µs, only calls that reached a host
    assert sorted(a["OverheadLatency"]) == [100, 1000, 1000, 1000, 1000, 1000, 1000]
    assert a["_aws"]["Timestamp"] == 1_700_000_060_000
    assert docs["b"]["ModelLatency"] == 1000 and docs["b"]["Invocations"] == 1
    lines.clear()
    clock.now += 60
    emf.flush_if_due()
    assert lines == []  # nothing answered: nothing written


def test_latencies_are_sampled_down_to_100_values():
    emf, lines, clock = _writer(60)
    for i in range(10_000):
        emf.record("a", 200, (i + 1) * 1e-6 * 2, (i + 1) * 1e-6)
    emf.flush()
    doc = validate(lines[0].decode())
    assert doc["Invocations"] == 10_000
    assert len(doc["ModelLatency"]) == SAMPLES == len(doc["OverheadLatency"])
    assert len(set(doc["ModelLatency"])) == SAMPLES  # distinct values: a sample, not the first 100 repeated
    assert max(doc["ModelLatency"]) > 1000  # not only the first hundred


def test_interval_zero_writes_one_line_per_invocation():
    emf, lines, clock = _writer(0)
    emf.record("m", 200, 0.002, 0.0015)
    emf.record("m", 404, 0.001, None)
    assert len(lines) == 2
    ok, missing = (validate(line.decode()) for line in lines)
    assert (ok["Invocations"], ok["ModelLatency"], ok["OverheadLatency"]) == (1, 1500, 500)
    assert missing["Invocation4XXErrors"] == 1 and "ModelLatency" not in missing
    assert "ModelLatency" not in [m["Name"] for m in missing["_aws"]["CloudWatchMetrics"][0]["Metrics"]]
    emf.flush()
    assert len(lines) == 2


def test_a_model_name_that_needs_escaping_stays_one_valid_line():
    line = document("ns", 'odd "name"\n\u00e9', 1.5e9, 1, 0, 0, [1], [2]).decode()
    assert line.count("\n") == 1
    assert validate(line)["ModelName"] == 'odd "name"\n\u00e9'
