"""The multi-model API's checks and its loads across hosts (serving.http.models, routing)."""

from __future__ import annotations

import pytest

from serving.errors import BadRequest, Conflict, InsufficientMemory, NotFound
from serving.http.models import PAGE_LIMIT, check_url, load_request, page
from serving.http.routing import HostRouter


def test_a_load_request_gives_its_name_and_url(tmp_path):
    body = b'{"model_name": "m1", "url": "%s"}' % str(tmp_path / "models/m1/model").encode()
    assert load_request(body, tmp_path / "models") == ("m1", str(tmp_path / "models/m1/model"))


@pytest.mark.parametrize(
    "body",
    [b"", b"nul", b'"m1"', b"{}", b'{"model_name": "", "url": "/m"}', b'{"model_name": "m", "url": 3}',
     b'{"model_name": "a\\nb", "url": "/m"}', b'{"model_name": "%s", "url": "/m"}' % (b"x" * 1025)],
)  # fmt: skip
def test_a_malformed_load_request_is_refused(tmp_path, body):
    with pytest.raises(BadRequest):
        load_request(body, tmp_path)


def test_a_url_through_a_link_out_of_the_models_directory_is_refused(tmp_path):
    models = tmp_path / "models"
    (models / "m1").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (models / "m1" / "model").symlink_to(tmp_path / "outside")
    with pytest.raises(BadRequest, match="not under the models directory"):
        check_url(str(models / "m1" / "model"), models)
    (models / "m2").mkdir()
    check_url(str(models / "m2" / "model"), models)  # inside, existing or not: the host says 404


def test_a_models_directory_that_is_itself_a_link_is_followed(tmp_path):
    (tmp_path / "real" / "m1").mkdir(parents=True)
    (tmp_path / "models").symlink_to(tmp_path / "real")
    check_url(str(tmp_path / "models" / "m1"), tmp_path / "models")


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({}, (0, PAGE_LIMIT)),
        ({"next_page_token": "5", "limit": "2"}, (5, 2)),
        ({"limit": "1000"}, (0, PAGE_LIMIT)),
    ],
)
def test_pages_start_at_the_token_and_hold_at_most_the_page_limit(query, expected):
    assert page(query) == expected


@pytest.mark.parametrize("query", [{"next_page_token": "x"}, {"next_page_token": "-1"}, {"limit": "0"}])
def test_a_bad_page_query_is_refused(query):
    with pytest.raises(BadRequest):
        page(query)


class _Host:
    """A host client that keeps a set of loaded names, and may refuse loads with ``refuse``."""

    def __init__(self, name: str, refuse: Exception | None = None):
        self.name, self.refuse = name, refuse
        self.models: set[str] = set()
        self.outstanding = 0

    def load(self, model, path, deadline):
        if self.refuse is not None:
            raise self.refuse
        if model in self.models:
            raise Conflict(f"model {model!r} is already loaded")
        self.models.add(model)
        return {"name": model, "path": path}

    def unload(self, model, deadline):
        if model not in self.models:
            raise NotFound(f"model {model!r} is not loaded")
        self.models.discard(model)


def _router(*hosts: _Host) -> HostRouter:
    router = HostRouter([])
    router.clients = list(hosts)
    return router


def test_a_load_goes_to_every_host():
    hosts = _Host("a"), _Host("b")
    assert _router(*hosts).load("m", "/p", 0.0) == {"name": "m", "path": "/p"}
    assert [h.models for h in hosts] == [{"m"}, {"m"}]


def test_a_load_one_host_refuses_is_taken_back_from_the_hosts_before_it():
    hosts = _Host("a"), _Host("b"), _Host("c", refuse=InsufficientMemory("full"))
    with pytest.raises(InsufficientMemory):
        _router(*hosts).load("m", "/p", 0.0)
    assert [h.models for h in hosts] == [set(), set(), set()]


def test_a_second_load_of_a_name_is_refused_by_the_first_host_and_touches_no_other():
    first, second = _Host("a"), _Host("b")
    first.models.add("m")  # another worker's load of "m" got there first and is still going on
    with pytest.raises(Conflict):
        _router(first, second).load("m", "/p", 0.0)
    assert (first.models, second.models) == ({"m"}, set())  # the winner's load is untouched


def test_an_unload_is_404_only_when_no_host_had_the_model():
    hosts = _Host("a"), _Host("b")
    hosts[1].models.add("m")  # left on one host by a roll-back that failed
    router = _router(*hosts)
    router.unload("m", 0.0)
    assert hosts[1].models == set()
    with pytest.raises(NotFound):
        router.unload("m", 0.0)


def test_a_load_or_unload_forgets_the_worker_s_description():
    router = _router(_Host("a"))
    router._described["m"] = (0.0, {"raw": True})
    router.load("m", "/p", 0.0)
    assert router.usable("m") == (None, False)
    router._described["m"] = (0.0, {"raw": True})
    router.unload("m", 0.0)
    assert "m" not in router._described
