"""Load testing for onebox servers: a closed-loop HTTP load generator and the ``onebox bench`` CLI.

Imports nothing from the rest of ``serving``; it talks to a server only over HTTP.
"""

from serving.bench.loadgen import LoadResult, run_load

__all__ = ["LoadResult", "run_load"]
