"""Per-key quotas, held in Redis: they bind across two front processes, one key over its quota
does not stop another, and a key's room comes back when its jobs end or its window passes."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.secure_stack import MAX_CONCURRENT, MODEL, RATE, RATE_SECONDS, SecureStack, headers

pytestmark = pytest.mark.e2e

LONG = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 100}


def _post(url: str, who: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", json=LONG, headers=headers(who), timeout=10)


def _cancel(url: str, who: str, job_id: str) -> None:
    r = httpx.post(f"{url}/v1/jobs/{job_id}/cancel", headers=headers(who), timeout=10)
    assert r.status_code in (200, 409), r.text


def test_a_key_over_its_concurrent_jobs_gets_429_on_any_front_while_another_key_submits(
    secure: SecureStack,
) -> None:
    first = [_post(secure.a, "dave") for _ in range(MAX_CONCURRENT)]
    assert [r.status_code for r in first] == [202] * MAX_CONCURRENT
    ids = [r.json()["id"] for r in first]
    ids_erin: list[str] = []
    try:
        over = _post(secure.b, "dave")  # the other front counts the same jobs
        assert over.status_code == 429
        error = over.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "concurrency_limit_exceeded"
        assert "STREAMQ_KEY_MAX_CONCURRENT" in error["message"]
        assert int(over.headers["retry-after"]) >= 1
        other = _post(secure.b, "erin")
        assert other.status_code == 202, "one key's quota must not stop another key"
        ids_erin.append(other.json()["id"])
        # OpenAI routes answer the same 429, in the same envelope.
        chat = httpx.post(
            f"{secure.a}/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
            headers=headers("dave"),
            timeout=10,
        )
        assert chat.status_code == 429 and chat.json()["error"]["code"] == "concurrency_limit_exceeded"
        # A job that ends gives its place back.
        _cancel(secure.a, "dave", ids.pop())
        again = _post(secure.b, "dave")
        assert again.status_code == 202, again.text
        ids.append(again.json()["id"])
    finally:
        for job_id in ids:
            _cancel(secure.a, "dave", job_id)
        for job_id in ids_erin:
            _cancel(secure.a, "erin", job_id)


def test_a_key_over_its_request_rate_gets_429_until_its_window_passes(secure: SecureStack) -> None:
    fronts = (secure.a, secure.b)
    for i in range(RATE):  # across both fronts; each job is canceled so concurrency stays low
        r = _post(fronts[i % 2], "frank")
        assert r.status_code == 202, f"request {i + 1} of {RATE}: {r.text}"
        _cancel(fronts[i % 2], "frank", r.json()["id"])
    over = _post(secure.a, "frank")
    assert over.status_code == 429
    error = over.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "STREAMQ_KEY_RATE_LIMIT" in error["message"]
    assert f"({RATE} per {RATE_SECONDS} seconds," in error["message"], error  # as a person says it
    retry = int(over.headers["retry-after"])
    assert 1 <= retry <= RATE_SECONDS
    assert _post(secure.b, "erin").status_code == 202, "another key keeps its own rate"
    time.sleep(retry + 0.2)
    after = _post(secure.b, "frank")
    assert after.status_code == 202, after.text
    _cancel(secure.b, "frank", after.json()["id"])
