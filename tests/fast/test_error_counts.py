"""Every error answer is counted by status and code (``streamq_api_errors_total``), whichever
layer gave it: the key check, the body limit, a route's own refusal, a body that is not valid.
An operator saw 429s and 400s only as uvicorn's access lines, with neither code nor key."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.auth import ApiKeys
from tests.fast.conftest import KEY_A, _settings, open_front

pytestmark = pytest.mark.anyio


async def test_error_answers_are_counted_by_status_and_code() -> None:
    settings = _settings(max_body_bytes=4096, models="nobody-serves-it")
    async for front in open_front(settings, ApiKeys([("a", KEY_A)])):
        key = {"Authorization": f"Bearer {KEY_A}"}
        answers = [
            await front.http.get("/v1/jobs/nope"),  # no key
            await front.http.get("/v1/jobs/nope", headers=key),
            await front.http.get("/v1/jobs/other", headers=key),
            await front.http.post("/v1/jobs", content=b"x" * 5000, headers=key),
            await front.http.post("/v1/jobs", json={"prompt": "hi", "colour": "red"}, headers=key),
            await front.http.post(
                "/v1/jobs", content=b"{not json", headers=key | {"Content-Type": "application/json"}
            ),
            await front.http.get("/v1/models", headers=key),  # no error: not counted
            await front.http.get("/readyz"),  # not ready (no worker): a probe's answer, not counted
        ]
        assert [a.status_code for a in answers] == [401, 404, 404, 413, 400, 400, 200, 503]
        scraped = (await front.http.get("/metrics")).text
    counted = {
        (sample.labels["status"], sample.labels["code"]): sample.value
        for family in text_string_to_metric_families(scraped)
        if family.name == "streamq_api_errors"
        for sample in family.samples
        if sample.name == "streamq_api_errors_total"
    }
    assert counted == {
        ("401", "invalid_api_key"): 1,
        ("404", "job_not_found"): 2,
        ("413", "request_too_large"): 1,
        ("400", "unsupported_parameter"): 1,
        ("400", "invalid_json"): 1,
    }, counted
