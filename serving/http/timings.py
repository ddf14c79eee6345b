"""Where a loop worker's requests spend their time, summed, for profiling a served model.

Four stretches of every fast-path request, in seconds summed over requests:
- ``wait_s``: its body whole → its call sent to a host (decoding, and waiting for the turn's end
  to go with the others gathered with it);
- ``host_s``: the call sent → the host's answer whole (the host's queue, batch and reply);
- ``back_s``: of ``host_s``, the host's reply leaving it (its clock) → the answer whole here: the
  way back (the host's stats give the way there, ``arrive_s``);
- ``answer_s``: the answer whole → this request's response handed to its socket (splitting the
  answer and encoding its rows, after the earlier members of its call);
- ``turnaround_s`` (over ``turns``, the requests that followed an answer on a kept-alive
  connection): the previous response handed to the socket → this request's body whole — the
  client's own time and the transfer of its request, outside the server.

With ``ONEBOX_FRONTEND_TIMINGS`` set to a directory, every loop worker writes its sums there once a
second as ``frontend-<pid>.json`` (benchmarks/gpu_resnet50.py reads them); nothing is written
otherwise, and counting costs a few clock reads per request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FIELDS = ("requests", "wait_s", "host_s", "back_s", "answer_s", "turns", "turnaround_s")


class Timings:
    """The sums of one worker (one thread: no locking)."""

    __slots__ = FIELDS + ("_path",)

    def __init__(self, directory: Path | None):
        self.requests = self.turns = 0
        self.wait_s = self.host_s = self.back_s = self.answer_s = self.turnaround_s = 0.0
        self._path = Path(directory) / f"frontend-{os.getpid()}.json" if directory is not None else None

    def answered(
        self, read_at: float, sent_at: float, answered_at: float, done_at: float, back: float = 0.0
    ) -> None:
        """One request went out at ``sent_at`` after its body was whole at ``read_at``; its
        call's answer was whole at ``answered_at`` (``back`` seconds after the host sent it) and
        its response handed over at ``done_at``."""
        self.requests += 1
        self.wait_s += sent_at - read_at
        self.host_s += answered_at - sent_at
        self.back_s += back
        self.answer_s += done_at - answered_at

    def turned(self, seconds: float) -> None:
        """A request's body was whole ``seconds`` after the connection's previous response."""
        self.turns += 1
        self.turnaround_s += seconds

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in FIELDS}

    def dump(self) -> None:
        """Write the sums (atomically) when a directory was given."""
        if self._path is None:
            return
        temporary = self._path.with_suffix(".tmp")
        try:
            temporary.write_text(json.dumps(self.as_dict()))
            os.replace(temporary, self._path)
        except OSError:
            pass  # a profile must never take a frontend down


def read_all(directory: Path) -> dict:
    """The sums of every worker that wrote into ``directory``, added up."""
    total = dict.fromkeys(FIELDS, 0)
    for path in Path(directory).glob("frontend-*.json"):
        try:
            sums = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for name in FIELDS:
            total[name] += sums.get(name, 0)
    return total
