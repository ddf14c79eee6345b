"""What the batcher reports about every batch it ran, for the metrics layer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchStats:
    """One executed batch: its size, its padding waste and where the time went."""

    rows: int  # real rows
    padding: int  # padded rows added to reach an allowed batch size
    requests: int  # requests (or parts of split requests) in the batch
    queue_times: tuple[float, ...]  # seconds each part waited from submit to batch start
    compute_time: float  # seconds from the batch's start in the runner to its outputs back
    build_time: float = 0.0  # seconds assembling the batch from its requests' rows (after the take)
    launch_time: float = 0.0  # seconds the runner's launch took (pipelined runners; part of compute)
