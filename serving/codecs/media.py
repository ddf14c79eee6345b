"""Media types: parsing a Content-Type and choosing a response type from an Accept header.

Negotiation follows RFC 9110 loosely, the way SageMaker clients use it: the highest quality
value wins, ties go to the range listed first (the inference toolkit's "first supported wins"),
specificity is not ranked, ``q=0`` excludes a type, and a malformed ``q`` counts as 1.
"""

from __future__ import annotations

import math

from serving.codecs.registry import encodable_types
from serving.errors import NotAcceptable


def parse_media_type(header: str | None) -> str:
    """The bare, lower-case media type of a header value: ``"Application/JSON; charset=utf-8"``
    gives ``"application/json"``; a missing or empty header gives ``""``."""
    if not header:
        return ""
    return header.split(";", 1)[0].strip().lower()


def negotiate(accept: str | None, default: str) -> str:
    """The media type to answer in, given the request's Accept header.

    A missing or empty Accept gives ``default`` (``SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT``).
    ``*/*`` and ``type/*`` give ``default`` when it is supported and matches, else the first
    supported type that matches. Raises NotAcceptable (406) when nothing acceptable can be written.
    """
    if accept is None or not accept.strip():
        return default
    supported = encodable_types()
    ranges = _parse_accept(accept)
    excluded = {media_range for media_range, q in ranges if q == 0}
    # sorted() is stable, so equal quality keeps header order.
    for media_range, _ in sorted((r for r in ranges if r[1] > 0), key=lambda r: -r[1]):
        choice = _resolve(media_range, default, supported, excluded)
        if choice:
            return choice
    raise NotAcceptable(f"cannot answer in any of: {accept.strip()}; supported: {', '.join(supported)}")


def _parse_accept(accept: str) -> list[tuple[str, float]]:
    ranges = []
    for entry in accept.split(","):
        media_range, *params = entry.split(";")
        media_range = media_range.strip().lower()
        if not media_range:
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                q = _quality(value)
        ranges.append(("*/*" if media_range == "*" else media_range, q))
    return ranges


def _quality(value: str) -> float:
    try:
        q = float(value.strip())
    except ValueError:
        return 1.0
    return min(max(q, 0.0), 1.0) if math.isfinite(q) else 1.0


def _resolve(media_range: str, default: str, supported: tuple[str, ...], excluded: set[str]) -> str | None:
    if "*" not in media_range:
        return media_range if media_range in supported else None
    major = media_range.split("/", 1)[0]
    for candidate in (default, *supported):
        matches = major == "*" or candidate.split("/", 1)[0] == major
        if matches and candidate in supported and candidate not in excluded:
            return candidate
    return None
