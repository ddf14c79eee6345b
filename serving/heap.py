"""The cyclic garbage collector in the server's long-lived processes.

CPython's collector scans every tracked object it holds in a generation, and its oldest
generation holds everything a process imported: flask, gunicorn and numpy in a frontend, torch
and a loaded model in a host. Left alone, a frontend or host under load stops for that scan, GIL
held, every few seconds: 34-70 ms on the 2-core CPU VM (benchmarks/RESULTS.md), during which
none of its connections is read or answered. Once a process is set up, :func:`settle` collects
once and moves what is alive out of the collector's sight (``gc.freeze``), so later collections
scan only what was made since. Nothing is leaked by that: frozen objects are still freed by
reference counting, and :func:`resettle` (after a model is unloaded) hands them back to the
collector first, so cycles a dropped model leaves are collected.
"""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect, then freeze every object still alive (a process that has finished setting up)."""
    gc.collect()
    gc.freeze()


def resettle() -> None:
    """Unfreeze, collect and freeze again: after objects frozen earlier may have become garbage."""
    gc.unfreeze()
    settle()


def census() -> dict:
    """What the collector holds back and has done in this process: the objects frozen, and the
    collections run so far per generation (youngest first)."""
    return {"frozen": gc.get_freeze_count(), "collections": [g["collections"] for g in gc.get_stats()]}
