"""Request and response body codecs: bytes <-> named numpy arrays, and content negotiation.

Pure functions of bytes, strings and numpy arrays; no web or ML framework is imported here.
"""

from serving.codecs.media import negotiate, parse_media_type
from serving.codecs.registry import decodable_types, decode, encodable_types, encode

__all__ = ["decodable_types", "decode", "encodable_types", "encode", "negotiate", "parse_media_type"]
