"""Content-Type parsing and Accept negotiation (contract cases 13, 14, 18, 19, 21)."""

import pytest

from serving.codecs import encodable_types, negotiate, parse_media_type
from serving.errors import NotAcceptable

JSON, CSV, NPY, NPZ = "application/json", "text/csv", "application/x-npy", "application/x-npz"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Application/JSON; charset=utf-8", JSON),
        ("text/csv", CSV),
        ("  application/x-npy ;", NPY),
        (None, ""),
        ("", ""),
    ],
)
def test_parse_media_type_drops_parameters_and_case(header, expected):
    assert parse_media_type(header) == expected


@pytest.mark.parametrize("accept", [None, "", "   "])
def test_missing_accept_gives_the_default(accept):
    assert negotiate(accept, CSV) == CSV


@pytest.mark.parametrize("default", [JSON, CSV, NPY])
def test_any_type_gives_the_default(default):
    assert negotiate("*/*", default) == default
    assert negotiate("*", default) == default


def test_first_supported_type_wins_over_unsupported_ones():
    assert negotiate("image/png, text/csv", JSON) == CSV


def test_higher_quality_wins_over_header_order():
    assert negotiate("text/csv;q=0.5, application/json", CSV) == JSON


def test_equal_quality_keeps_header_order():
    assert negotiate("application/x-npy;q=0.8, text/csv;q=0.8", JSON) == NPY
    assert negotiate("text/csv, */*", JSON) == CSV
    assert negotiate("*/*, text/csv", JSON) == JSON


def test_accept_parameters_other_than_quality_are_ignored():
    assert negotiate("application/json; charset=utf-8", CSV) == JSON


def test_zero_quality_excludes_a_type_even_under_a_wildcard():
    assert negotiate("application/json;q=0, */*;q=0.1", JSON) == CSV
    with pytest.raises(NotAcceptable):
        negotiate("text/csv;q=0", JSON)


def test_subtype_wildcard_prefers_the_default_when_it_matches():
    assert negotiate("application/*", NPY) == NPY
    assert negotiate("application/*", CSV) == JSON
    assert negotiate("text/*", JSON) == CSV


def test_wildcard_skips_an_unsupported_default():
    assert negotiate("*/*", "text/plain") == encodable_types()[0]


def test_malformed_quality_counts_as_one():
    assert negotiate("text/csv;q=abc, application/json;q=0.9", JSON) == CSV


def test_only_unsupported_types_answer_406_naming_what_is_supported():
    with pytest.raises(NotAcceptable) as caught:
        negotiate("image/png, application/xml", JSON)
    assert caught.value.status == 406
    assert "image/png" in caught.value.message
    for media_type in encodable_types():
        assert media_type in caught.value.message
