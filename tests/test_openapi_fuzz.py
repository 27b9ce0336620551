"""schemathesis over the front's own OpenAPI schema, through real HTTP to a keyed front with a fast
synthetic worker: no input it generates, valid or not, gets a 5xx or an answer that breaks the
schema (status codes, content types, response bodies). Bounded in examples to stay quick."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok
from schemathesis.generation import GenerationMode

from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_synthetic_worker, wait_workers

pytestmark = pytest.mark.e2e

KEY = "sk-fuzz-6a7b8c9d"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzzed_front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logdir: Path = tmp_path_factory.mktemp("fuzz")
    redis_server = RedisServer()
    env = {
        "STREAMQ_REDIS_URL": redis_server.url,
        "STREAMQ_API_KEYS": f"fuzz:{KEY}",
        "STREAMQ_MAX_TOKENS_LIMIT": "64",
        "STREAMQ_KEY_MAX_CONCURRENT": "0",
        "STREAMQ_KEY_RATE_LIMIT": "",
    }
    services: list[Service] = []  # each one stopped below, whatever fails while they start
    try:
        services.append(
            start_synthetic_worker(env, logdir, "synth", "fuzz-worker", tokens_per_second=5000, slots=8)
        )
        front, url = start_front(env, logdir, "fuzz-front")
        services.append(front)
        wait_workers(url, 1)
        yield url
    finally:
        for service in services:
            service.stop()
        redis_server.close()
        for service in services:
            assert "Traceback" not in service.log(), service.log()


def test_no_input_gets_a_server_error_or_breaks_the_schema(fuzzed_front: str) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzzed_front}/openapi.json")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # an operation the schema could not describe
        operations.append(result.ok())
    assert len(operations) >= 10, "the schema lost its operations"
    auth = {"Authorization": f"Bearer {KEY}"}
    calls: list[int] = []
    for operation, mode in itertools.product(operations, GenerationMode):

        @given(case=operation.as_strategy(mode))
        @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def fuzz(case: schemathesis.Case[Any]) -> None:
            response = case.call_and_validate(headers=auth, checks=CHECKS, timeout=30)
            calls.append(response.status_code)

        try:
            fuzz()
        except Unsatisfiable:  # no invalid input exists (e.g. no parameters, or any string fits)
            assert mode is GenerationMode.NEGATIVE, operation.label
    assert any(200 <= code < 300 for code in calls) and any(400 <= code < 500 for code in calls)
