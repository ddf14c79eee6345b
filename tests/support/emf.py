"""Contract §6.2: what makes a line a valid CloudWatch Embedded Metric Format document."""

from __future__ import annotations

import json

UNITS = {
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes",
    "Bits", "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second",
    "Kilobytes/Second", "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second",
    "Kilobits/Second", "Megabits/Second", "Gigabits/Second", "Terabits/Second", "Count/Second", "None",
}  # fmt: skip


def validate(line: str) -> dict:
    """The document on ``line``, or AssertionError naming what §6.2 it breaks."""
    doc = json.loads(line)  # a single JSON object, nothing before or after it
    assert isinstance(doc, dict), "not a JSON object"
    aws = doc["_aws"]
    assert isinstance(aws["Timestamp"], int) and not isinstance(aws["Timestamp"], bool), "Timestamp not int"
    assert aws["Timestamp"] > 1_000_000_000_000, "Timestamp not in milliseconds"
    directives = aws["CloudWatchMetrics"]
    assert isinstance(directives, list) and directives
    for directive in directives:
        assert isinstance(directive["Namespace"], str) and 1 <= len(directive["Namespace"]) <= 255
        assert len(directive["Metrics"]) <= 100, "more than 100 metrics in a directive"
        for dimension_set in directive["Dimensions"]:
            assert len(dimension_set) <= 9
            for key in dimension_set:
                assert isinstance(doc.get(key), str), f"dimension {key!r} is not a top-level string"
        for metric in directive["Metrics"]:
            assert metric.get("Unit", "None") in UNITS, metric
            value = doc.get(metric["Name"])  # a top-level member: nested paths are not allowed
            assert "." not in metric["Name"]
            if isinstance(value, list):
                assert 1 <= len(value) <= 100, f"{metric['Name']}: {len(value)} values"
                assert all(_number(v) for v in value), metric["Name"]
            else:
                assert _number(value), f"{metric['Name']} = {value!r} is not a number"
    return doc


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def documents(stdout: str) -> list[dict]:
    """Every EMF document among a server's stdout lines, each validated."""
    return [validate(line) for line in stdout.splitlines() if line.startswith("{")]
