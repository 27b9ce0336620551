"""``Idempotency-Key`` at the front's boundary, over the in-memory job system: what the header
must be, the answer to a request sent again, the key with another request or another API key,
and the routes that refuse it. The Redis side (the submit script, any front) is
tests/test_idempotency.py's."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fast.conftest import KEY_A, KEY_B, Front

pytestmark = pytest.mark.anyio

HELLO = {"messages": [{"role": "user", "content": "hello there world"}]}


def _key(value: str, api_key: str | None = None) -> dict[str, str]:
    return {"Idempotency-Key": value} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})


async def test_a_request_sent_again_gets_the_job_the_first_made(front: Front) -> None:
    first = await front.http.post("/v1/jobs", json=HELLO, headers=_key("k-1"))
    again = await front.http.post("/v1/jobs", json=HELLO, headers=_key("k-1"))
    assert first.status_code == again.status_code == 202
    assert "idempotent-replayed" not in first.headers and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    other = await front.http.post("/v1/jobs", json=HELLO, headers=_key("k-2"))
    plain = await front.http.post("/v1/jobs", json=HELLO)
    assert len({first.json()["id"], other.json()["id"], plain.json()["id"]}) == 3

    changed = await front.http.post("/v1/jobs", json={**HELLO, "max_tokens": 5}, headers=_key("k-1"))
    assert changed.status_code == 400
    error = changed.json()["error"]
    assert (error["param"], error["code"]) == ("Idempotency-Key", "idempotency_key_reused")


async def test_another_api_keys_same_key_is_another_job(keyed: Front) -> None:
    a = await keyed.http.post("/v1/jobs", json=HELLO, headers=_key("shared", KEY_A))
    b = await keyed.http.post("/v1/jobs", json=HELLO, headers=_key("shared", KEY_B))
    assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]
    assert "idempotent-replayed" not in b.headers


@pytest.mark.parametrize("value", ["x" * 256, "a\tb", " "])
async def test_a_key_that_is_not_one_is_a_400_naming_it(front: Front, value: str) -> None:
    answer = await front.http.post("/v1/jobs", json=HELLO, headers=_key(value))
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "Idempotency-Key"


async def test_a_key_of_the_longest_length_is_one(front: Front) -> None:
    answer = await front.http.post("/v1/jobs", json=HELLO, headers=_key("x" * 255))
    assert answer.status_code == 202, answer.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"model": "fake-model", **HELLO}),
        ("/v1/completions", {"model": "fake-model", "prompt": "hi"}),
        ("/v1/responses", {"model": "fake-model", "input": "hi"}),
        ("/", {"prompt": "hi", "history": []}),
        ("/stream", {"prompt": "hi", "history": []}),
    ],
)
async def test_routes_whose_job_lives_with_the_connection_refuse_it(
    front: Front, path: str, body: dict[str, Any]
) -> None:
    answer = await front.http.post(path, json=body, headers=_key("k-1"))
    assert answer.status_code == 400 and "Idempotency-Key" in answer.text
    assert not front.jobs.jobs  # no job made


async def test_a_background_response_sent_again_is_the_same_response(front: Front) -> None:
    body = {"model": "fake-model", "input": "hi there", "background": True}
    first = await front.http.post("/v1/responses", json=body, headers=_key("r-1"))
    again = await front.http.post("/v1/responses", json=body, headers=_key("r-1"))
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    assert len(front.jobs.jobs) == 1
