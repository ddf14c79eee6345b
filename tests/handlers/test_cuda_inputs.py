"""Which copies a batch's parts become (handlers.cuda_inputs), checked with CPU tensors.

On a GPU the target is device memory and the copies are asynchronous; here the target is a CPU
tensor that records each copy, so the choice between "straight from where it lies" and "through
the staging buffer, one copy per run of staged rows" is checked on any machine.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from handlers.cuda_inputs import _copy_parts  # noqa: E402


class Target:
    """A tensor that records the copies made into its row ranges."""

    def __init__(self, shape, dtype=torch.float32):
        self.tensor = torch.zeros(shape, dtype=dtype)
        self.copies: list[tuple[int, int, str]] = []
        self.staging = None

    def __getitem__(self, rows: slice):
        target = self

        class Slice:
            def copy_(self, source, non_blocking=False):
                assert non_blocking, "copies to the device are queued, never waited for"
                staged = (
                    target.staging is not None
                    and source.data_ptr() >= target.staging.data_ptr()
                    and (source.data_ptr() < target.staging.data_ptr() + target.staging.nbytes)
                )
                target.copies.append((rows.start, rows.stop, "staged" if staged else "direct"))
                target.tensor[rows].copy_(source)

        return Slice()


def parts_of(*counts: int) -> list[np.ndarray]:
    rng = np.random.default_rng(sum(counts))
    return [rng.standard_normal((n, 3)).astype(np.float32) for n in counts]


def run(parts, covered: set[int]):
    target = Target((sum(len(p) for p in parts), 3))
    calls = []

    def host():
        calls.append(1)
        target.staging = torch.zeros(target.tensor.shape)
        return target.staging

    ids = {id(parts[i]) for i in covered}
    _copy_parts(parts, target, lambda p: id(p) in ids, host)
    np.testing.assert_array_equal(target.tensor.numpy(), np.concatenate(parts))
    return target, calls


def test_parts_in_registered_memory_are_copied_as_they_lie_one_copy_each():
    target, calls = run(parts_of(2, 1, 3), covered={0, 1, 2})
    assert target.copies == [(0, 2, "direct"), (2, 3, "direct"), (3, 6, "direct")]
    assert calls == []  # the staging buffer is not even asked for


def test_consecutive_parts_elsewhere_are_staged_and_copied_together():
    target, calls = run(parts_of(1, 2, 1, 1, 2), covered={2})
    assert target.copies == [(0, 3, "staged"), (3, 4, "direct"), (4, 7, "staged")]
    assert calls == [1]
    staged = target.staging.numpy()
    parts = parts_of(1, 2, 1, 1, 2)
    np.testing.assert_array_equal(staged[:3], np.concatenate(parts[:2]))
    np.testing.assert_array_equal(staged[4:7], np.concatenate(parts[3:]))


def test_a_batch_built_in_the_staging_buffer_is_not_copied_into_it_again():
    target = Target((4, 3))
    staging = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    target.staging = staging
    built = staging.numpy()  # the batch already lies there (assembled in it)
    _copy_parts([built], target, lambda p: False, lambda: staging)
    assert target.copies == [(0, 4, "staged")]
    np.testing.assert_array_equal(target.tensor.numpy(), np.arange(12).reshape(4, 3))
