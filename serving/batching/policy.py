"""The batching knobs of one model and their consistency check."""

from __future__ import annotations

import math
from dataclasses import dataclass

from serving.errors import ConfigError


@dataclass(frozen=True)
class BatchPolicy:
    """How one model's requests are queued and grouped into batches.

    Sizes count rows (samples), never requests, so a cap cannot stop a batch from filling.
    """

    max_batch_size: int = 1  # rows per batch (1 = batching off)
    max_delay_ms: float = 0.0  # 0: dispatch whatever is queued the moment the runner is free
    batch_sizes: tuple[int, ...] = ()  # static sizes: pad a batch up to the next one
    max_queue: int = 1024  # queued rows before submit raises QueueFull
    splittable: bool = True  # False: no batch dimension; each request runs alone, untouched
    concurrent_batches: int = (
        1  # batches in flight at once: >1 overlaps one batch's host work with another's device work
    )

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the knob when the settings contradict each other."""
        if not _is_int(self.max_batch_size) or self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.max_delay_ms, (int, float)) or not (
            math.isfinite(self.max_delay_ms) and self.max_delay_ms >= 0
        ):
            raise ConfigError(f"max_delay_ms must be a finite number >= 0, got {self.max_delay_ms!r}")
        if not _is_int(self.concurrent_batches) or self.concurrent_batches < 1:
            raise ConfigError(f"concurrent_batches must be an integer >= 1, got {self.concurrent_batches!r}")
        if not _is_int(self.max_queue) or self.max_queue < 1:
            raise ConfigError(f"max_queue must be an integer >= 1, got {self.max_queue!r}")
        sizes = tuple(self.batch_sizes)
        if any(not _is_int(s) or s < 1 for s in sizes):
            raise ConfigError(f"batch_sizes must be integers >= 1, got {list(sizes)}")
        if any(b <= a for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ConfigError(f"batch_sizes must be sorted ascending without duplicates, got {list(sizes)}")
        if not self.splittable:
            if sizes:
                raise ConfigError(
                    f"batch_sizes {list(sizes)} need a batch dimension, but this model's inputs have none"
                )
            return  # each request runs alone: max_batch_size does not apply
        if sizes and self.max_batch_size > sizes[-1]:
            raise ConfigError(
                f"max_batch_size {self.max_batch_size} is larger than the largest of batch_sizes "
                f"{list(sizes)}; such a batch could not be padded to an allowed size"
            )
        if self.max_queue < self.max_batch_size:
            raise ConfigError(
                f"max_queue ({self.max_queue} rows) is smaller than max_batch_size "
                f"({self.max_batch_size} rows), so a batch could never fill"
            )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
