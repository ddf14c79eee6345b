"""Which model host answers a request, and what each model expects.

Each frontend worker keeps one ``HostClient`` per host. Requests go to the host with the
fewest calls in flight from this worker; model descriptions (raw or tensors, signature) are
cached briefly so the request path makes one IPC call, not two.
"""

from __future__ import annotations

import logging
import time

from serving.errors import NotFound, NotReady, ServingError
from serving.ipc.client import HostClient
from serving.ipc.protocol import SHM_MIN_BYTES
from serving.types import TensorSpec

log = logging.getLogger("onebox.http")

DESCRIBE_TTL_S = 2.0
#: a loop worker keeps using a description this old while it fetches a newer one in the background
DESCRIBE_STALE_S = 30.0
HEALTH_TIMEOUT_S = 1.0


class HostRouter:
    """Routes calls from one frontend worker to the model hosts."""

    def __init__(self, hosts: list[dict], shm_min_bytes: int | None = SHM_MIN_BYTES):
        """``shm_min_bytes``: request tensors from this size travel through shared memory."""
        self.clients = [HostClient(h["socket"], h["name"], shm_min_bytes) for h in hosts]
        self._described: dict[str, tuple[float, dict]] = {}
        self._last_health_error: ServingError | None = None

    # -- health --------------------------------------------------------------------------
    def ready(self, models: bool = True) -> bool:
        """True when every host answers and, with ``models``, has every model loaded and warmed
        (without: a multi-model endpoint, up with no model loaded)."""
        try:
            for client in self.clients:
                health = client.health(time.time() + HEALTH_TIMEOUT_S)
                if models and not health["ready"]:
                    self._last_health_error = NotReady(_not_ready_reason(client.name, health))
                    return False
        except ServingError as err:
            self._last_health_error = err
            return False
        return True

    def not_ready_error(self) -> ServingError:
        """Why the last :meth:`ready` said no."""
        return self._last_health_error or NotReady("the model is not ready")

    # -- models --------------------------------------------------------------------------
    def describe(self, model: str, deadline: float) -> dict:
        """The host's description of ``model``: the one at hand if it is younger than
        ``DESCRIBE_TTL_S``, else fetched again."""
        info, stale = self.usable(model)
        if info is None or stale:
            info = self.pick().describe(model, deadline)
            self._described[model] = (time.monotonic(), info)
        return info

    def usable(self, model: str) -> tuple[dict | None, bool]:
        """The description of ``model`` a request may use now, and whether it is older than
        ``DESCRIBE_TTL_S`` (then it wants refreshing); ``(None, False)`` past ``DESCRIBE_STALE_S``
        or before the first. The host checks every call anyway, so a description a little out of
        date can only cost a request the error the host gives it."""
        cached = self._described.get(model)
        if not cached:
            return None, False
        age = time.monotonic() - cached[0]
        if age >= DESCRIBE_STALE_S:
            return None, False
        return cached[1], age >= DESCRIBE_TTL_S

    def forget(self, model: str) -> None:
        """Drop the description of ``model`` (loaded, unloaded or gone): the next call asks again."""
        self._described.pop(model, None)

    # -- a multi-model endpoint's models -------------------------------------------------
    def load(self, model: str, path: str, deadline: float) -> dict:
        """Load ``model`` on every host, in the same order from every worker: the first host
        decides between two loads of one name (the later one gets 409 there and touches no
        other). A host that fails unloads it from those before it, so no host keeps a part."""
        self.forget(model)
        done: list[HostClient] = []
        try:
            for client in self.clients:
                info = client.load(model, path, deadline)
                done.append(client)
        except ServingError:
            for client in done:
                try:
                    client.unload(model, deadline)
                except ServingError as err:  # it stays there; the next DELETE removes it
                    log.warning(
                        "could not take model %r back from host %s: %s", model, client.name, err.message
                    )
            raise
        return info

    def unload(self, model: str, deadline: float) -> None:
        """Unload ``model`` from every host (each finishes its requests for it first); NotFound
        when no host had it."""
        self.forget(model)
        missing: list[NotFound] = []
        for client in self.clients:
            try:
                client.unload(model, deadline)
            except NotFound as err:
                missing.append(err)
        if len(missing) == len(self.clients):
            raise missing[0]

    def loaded(self, deadline: float) -> list[dict]:
        """The descriptions of the models loaded and ready, by name (from the first host: every
        host holds the same ones)."""
        models = self.clients[0].health(deadline)["models"]
        return sorted((m for m in models if m["state"] == "ready"), key=lambda m: m["name"])

    def input_specs(self, model: str) -> tuple[TensorSpec, ...]:
        """The model's declared inputs, for decoding a body straight to the right dtypes."""
        cached = self._described.get(model)
        signature = cached[1].get("signature") if cached else None
        if not signature:
            return ()
        return tuple(TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in signature["inputs"])

    def call(self, header: dict, buffers: list, deadline: float) -> tuple[dict, list]:
        """One message to the least busy host, or to another when that one cannot be reached."""
        client = self.pick()
        try:
            return client.call(header, buffers, deadline)
        except NotReady as err:
            if not self.may_fail_over(err):
                raise
            return self.pick(exclude=client).call(header, buffers, deadline)

    def pick(self, exclude: HostClient | None = None) -> HostClient:
        """The host with the fewest calls in flight from this process (other than ``exclude``)."""
        candidates = [c for c in self.clients if c is not exclude] or self.clients
        return min(candidates, key=lambda c: c.outstanding)

    def may_fail_over(self, err: NotReady) -> bool:
        """Whether a call that failed with ``err`` should be tried once on another host."""
        return len(self.clients) > 1 and "not reachable" in err.message


def _not_ready_reason(host: str, health: dict) -> str:
    models = health.get("models") or []
    if not models:
        return f"host {host} has no model loaded"
    parts = []
    for m in models:
        if m["state"] == "failed":
            parts.append(f"model {m['name']!r} failed to load: {m['error']}")
        elif m["state"] != "ready":
            parts.append(f"model {m['name']!r} is {m['state']}")
    return "; ".join(parts) or "not ready"
