"""Dynamic batching for one model: a row-counting queue, deadlines, padding to static sizes.

Knows nothing of HTTP, IPC or ML frameworks; imports only ``serving.errors`` and ``serving.types``.
"""

from serving.batching.batcher import Batcher
from serving.batching.outcome import Outcome
from serving.batching.policy import BatchPolicy
from serving.batching.stats import BatchStats

__all__ = ["BatchPolicy", "BatchStats", "Batcher", "Outcome"]
