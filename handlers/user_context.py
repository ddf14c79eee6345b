"""The ``context`` object handed to user scripts, compatible with MMS / the inference toolkit."""

from __future__ import annotations

from pathlib import Path

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"


def header_lookup(headers: dict[str, str], name: str) -> str | None:
    """A header value by case-insensitive name, or None."""
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


class RequestProcessor:
    """Per-request headers and response properties (MMS ``RequestProcessor``)."""

    def __init__(self, request_headers: dict[str, str]):
        self._request = dict(request_headers)
        self._response: dict[str, str] = {}
        self._status: tuple[int, str] | None = None

    def get_request_property(self, key: str) -> str | None:
        """A request header, case-insensitively."""
        return header_lookup(self._request, key)

    def get_request_properties(self) -> dict[str, str]:
        """All request headers."""
        return dict(self._request)

    def add_response_property(self, key: str, value: str) -> None:
        """Set a response header."""
        self._response[key] = value

    def get_response_headers(self) -> dict[str, str]:
        """The response headers set so far."""
        return self._response

    def report_status(self, code: int, reason_phrase: str | None = None) -> None:
        """Record a status the script wants (kept for compatibility; errors carry their own)."""
        self._status = (code, reason_phrase or "")

    def get_response_status(self) -> tuple[int, str] | None:
        """The status recorded by :meth:`report_status`, if any."""
        return self._status


class Context:
    """What MMS passes as ``context``: per-request headers plus ``system_properties``."""

    def __init__(self, model_dir: Path, gpu_id: int | None, request_headers: list[dict[str, str]]):
        self.system_properties = {
            "model_dir": str(model_dir),
            "gpu_id": gpu_id,
            "batch_size": len(request_headers),
            "server_name": "onebox",
        }
        self.request_processor = [RequestProcessor(h) for h in request_headers]

    def get_request_header(self, idx: int, key: str) -> str | None:
        """Request ``idx``'s header ``key`` (case-insensitive), or None."""
        return self.request_processor[idx].get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        """Every header of request ``idx``."""
        return self.request_processor[idx].get_request_properties()

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        """Set a response header for request ``idx`` (e.g. the custom attributes)."""
        self.request_processor[idx].add_response_property(key, value)

    def get_response_headers(self, idx: int) -> dict[str, str]:
        """Response headers set for request ``idx``."""
        return self.request_processor[idx].get_response_headers()

    def get_request_id(self, idx: int = 0) -> str | None:
        """Request id if the frontend passed one (onebox does not yet)."""
        return self.get_request_header(idx, "X-Amzn-RequestId")
