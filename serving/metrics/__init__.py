"""Metrics: Prometheus families shared by every process, CloudWatch EMF lines from the frontends.

- ``families.py`` — the ``onebox_*`` families (labels ``model``, ``device``, ``status``), and adding
  many observations to a histogram at once;
- ``tally.py`` — a frontend worker's invocations counted in memory, published once a second;
- ``emf.py`` — CloudWatch Embedded Metric Format lines, per interval or per invocation;
- ``hosts.py`` — what a model host reports: batches, queue, compute, loads, unloads, restarts;
- ``process.py`` — CPU and memory of each process; GPUs through NVML at scrape time;
- ``exposition.py`` — ``GET /metrics`` and the multiprocess directory.

Import rule: prometheus_client and the standard library only (never flask, gunicorn, an ML
framework, or another part of serving), so frontends and hosts can both use it.
"""
