"""The registry: which types are supported, unknown types, empty bodies (cases 20, 23)."""

import numpy as np
import pytest

from serving.codecs import decodable_types, decode, encodable_types, encode
from serving.errors import BadRequest, NotAcceptable, UnsupportedMediaType


def test_every_documented_format_decodes_and_encodes():
    expected = {"application/json", "text/csv", "application/x-npy", "application/x-npz"}
    assert set(decodable_types()) == expected
    assert set(encodable_types()) == expected
    assert encodable_types()[0] == "application/json"


def test_unknown_content_type_answers_415_listing_supported_types():
    with pytest.raises(UnsupportedMediaType) as caught:
        decode(b"<a/>", "application/xml")
    assert caught.value.status == 415
    assert "application/xml" in caught.value.message
    assert all(media_type in caught.value.message for media_type in decodable_types())


def test_missing_content_type_answers_415():
    with pytest.raises(UnsupportedMediaType):
        decode(b"[1]", "")


@pytest.mark.parametrize(
    "media_type", ["application/json", "text/csv", "application/x-npy", "application/x-npz"]
)
def test_empty_body_answers_400(media_type):
    with pytest.raises(BadRequest, match="empty"):
        decode(b"", media_type)


def test_encoding_to_an_unknown_type_is_not_acceptable():
    with pytest.raises(NotAcceptable):
        encode({"y": np.zeros(2)}, "image/png")


@pytest.mark.parametrize("media_type", ["application/x-npy", "text/csv"])
def test_several_outputs_in_a_one_array_format_answer_406_naming_a_format_that_works(media_type):
    with pytest.raises(NotAcceptable) as caught:
        encode({"a": np.zeros(2), "b": np.ones(2)}, media_type)
    assert "application/x-npz" in caught.value.message
    assert "a, b" in caught.value.message
