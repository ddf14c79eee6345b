"""Adding many observations at once matches observing them one by one."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from serving.metrics.families import LATENCY_BUCKETS, add_observations, bucket_index


def test_adding_bucket_counts_exposes_what_observing_each_value_does():
    values = [0.0, 0.0005, 0.0007, 0.001, 0.3, 0.3, 59.0, 60.0, 61.0, 1e9]
    one, many = CollectorRegistry(), CollectorRegistry()
    observed = Histogram("x_seconds", "x", ["model"], buckets=LATENCY_BUCKETS, registry=one)
    added = Histogram("x_seconds", "x", ["model"], buckets=LATENCY_BUCKETS, registry=many)
    for v in values:
        observed.labels("m").observe(v)
    counts = [0] * len(LATENCY_BUCKETS)
    for v in values:
        counts[bucket_index(LATENCY_BUCKETS, v)] += 1
    add_observations(added.labels("m"), counts, sum(values))

    def samples(registry):
        return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]

    assert samples(one) == samples(many)
