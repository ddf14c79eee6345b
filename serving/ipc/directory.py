"""The run directory's ``hosts.json``: where each model host listens, written by the launcher."""

from __future__ import annotations

import json
from pathlib import Path

HOSTS_FILE = "hosts.json"


def write_hosts_file(run_dir: Path, hosts: list[dict]) -> None:
    """Atomically write ``[{"name", "device", "socket"}, ...]``."""
    tmp = Path(run_dir) / (HOSTS_FILE + ".tmp")
    tmp.write_text(json.dumps(hosts))
    tmp.replace(Path(run_dir) / HOSTS_FILE)


def read_hosts_file(run_dir: Path) -> list[dict]:
    """The hosts the launcher started."""
    return json.loads((Path(run_dir) / HOSTS_FILE).read_text())
