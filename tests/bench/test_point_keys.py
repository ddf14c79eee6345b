"""gpu_resnet50.py keeps every served point of a repeated concurrency (``--concurrency 1,256,256``)."""

from __future__ import annotations

from benchmarks.gpu_resnet50 import point_key


def test_a_repeated_concurrency_gets_its_own_key_and_the_first_keeps_the_plain_one():
    points = [(1, 600), (256, 17_728), (256, 16_334), (256, 15_000), (64, 9_000)]
    concurrencies = [conc for conc, _ in points]
    results = {point_key(concurrencies, i): {"img_s": img_s} for i, (_, img_s) in enumerate(points)}
    assert list(results) == [1, 256, "256#2", "256#3", 64]
    assert max(r["img_s"] for r in results.values()) == 17_728  # the best point is not overwritten
