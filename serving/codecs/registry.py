"""The codecs by media type: one entry per format, so a new format is one line here.

``decode`` and ``encode`` are the whole interface the HTTP frontend uses; they take a media type
already parsed by :func:`serving.codecs.media.parse_media_type` or chosen by ``negotiate``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from serving.codecs import csv_codec, json_codec, npy_codec
from serving.errors import BadRequest, NotAcceptable, UnsupportedMediaType
from serving.types import Tensors, TensorSpec


@dataclass(frozen=True)
class Codec:
    """How one media type turns into named arrays and back (``encode`` None: requests only)."""

    decode: Callable[[bytes, tuple[TensorSpec, ...]], Tensors]
    encode: Callable[[Tensors], bytes] | None


CODECS: dict[str, Codec] = {
    json_codec.MEDIA_TYPE: Codec(json_codec.decode, json_codec.encode),
    csv_codec.MEDIA_TYPE: Codec(csv_codec.decode, csv_codec.encode),
    npy_codec.NPY: Codec(npy_codec.decode_npy, npy_codec.encode_npy),
    npy_codec.NPZ: Codec(npy_codec.decode_npz, npy_codec.encode_npz),
}


def decodable_types() -> tuple[str, ...]:
    """Media types accepted as request bodies (Content-Type)."""
    return tuple(CODECS)


def encodable_types() -> tuple[str, ...]:
    """Media types responses can be written in (Accept), in order of preference for wildcards."""
    return tuple(media_type for media_type, codec in CODECS.items() if codec.encode is not None)


def decode(body: bytes, media_type: str, inputs: tuple[TensorSpec, ...] = ()) -> Tensors:
    """Named arrays from a request body.

    ``inputs`` is the model's input signature when known: it names a single-array body, checks
    named bodies, and gives each array's dtype. Raises UnsupportedMediaType (415) for an unknown
    ``media_type`` and BadRequest (400) for an empty or undecodable body.
    """
    codec = CODECS.get(media_type)
    if codec is None:
        shown = media_type or "(none)"
        raise UnsupportedMediaType(
            f"Content-Type {shown} is not supported; use one of: {', '.join(decodable_types())}"
        )
    if not body:
        raise BadRequest("the request body is empty")
    return codec.decode(body, tuple(inputs))


def encode(outputs: Tensors, media_type: str) -> bytes:
    """Response bytes for the model's outputs in ``media_type`` (one of :func:`encodable_types`).

    Raises NotAcceptable (406) when the format cannot hold the outputs, e.g. several outputs
    as ``application/x-npy``, naming a format that can.
    """
    codec = CODECS.get(media_type)
    if codec is None or codec.encode is None:
        raise NotAcceptable(f"cannot write {media_type}; supported: {', '.join(encodable_types())}")
    return codec.encode(outputs)
