"""Which model host answers a request, and what each model expects.

Each frontend worker keeps one ``HostClient`` per host. Requests go to the host with the
fewest calls in flight from this worker; model descriptions (raw or tensors, signature) are
cached briefly so the request path makes one IPC call, not two.
"""

from __future__ import annotations

import time

from serving.errors import NotReady, ServingError
from serving.ipc.client import HostClient
from serving.ipc.protocol import SHM_MIN_BYTES
from serving.types import RawRequest, RawResponse, Tensors, TensorSpec

DESCRIBE_TTL_S = 2.0
HEALTH_TIMEOUT_S = 1.0


class HostRouter:
    """Routes calls from one frontend worker to the model hosts."""

    def __init__(self, hosts: list[dict], shm_min_bytes: int | None = SHM_MIN_BYTES):
        """``shm_min_bytes``: request tensors from this size travel through shared memory."""
        self.clients = [HostClient(h["socket"], h["name"], shm_min_bytes) for h in hosts]
        self._described: dict[str, tuple[float, dict]] = {}
        self._last_health_error: ServingError | None = None

    # -- health --------------------------------------------------------------------------
    def ready(self) -> bool:
        """True when every host has every model loaded and warmed."""
        try:
            for client in self.clients:
                health = client.health(time.time() + HEALTH_TIMEOUT_S)
                if not health["ready"]:
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
        """The host's description of ``model`` (cached for a moment)."""
        cached = self._described.get(model)
        now = time.monotonic()
        if cached and now - cached[0] < DESCRIBE_TTL_S:
            return cached[1]
        info = self._pick().describe(model, deadline)
        self._described[model] = (now, info)
        return info

    def input_specs(self, model: str) -> tuple[TensorSpec, ...]:
        """The model's declared inputs, for decoding a body straight to the right dtypes."""
        cached = self._described.get(model)
        signature = cached[1].get("signature") if cached else None
        if not signature:
            return ()
        return tuple(TensorSpec(i["name"], i["dtype"], tuple(i["shape"])) for i in signature["inputs"])

    def infer(self, model: str, inputs: Tensors, deadline: float) -> Tensors:
        """Run decoded inputs on the least busy host (another host if that one is down)."""
        return self._with_failover(lambda client: client.infer(model, inputs, deadline))

    def invoke(self, model: str, request: RawRequest, deadline: float) -> RawResponse:
        """Pass a raw request to a user-script model on the least busy host."""
        return self._with_failover(lambda client: client.invoke(model, request, deadline))

    def _pick(self, exclude: HostClient | None = None) -> HostClient:
        candidates = [c for c in self.clients if c is not exclude] or self.clients
        return min(candidates, key=lambda c: c.outstanding)

    def _with_failover(self, call):
        client = self._pick()
        try:
            return call(client)
        except NotReady as err:
            if len(self.clients) == 1 or "not reachable" not in err.message:
                raise
            return call(self._pick(exclude=client))


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
