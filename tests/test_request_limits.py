"""Each request limit is refused with its status and a message naming the limit, before any job
exists; CORS is off unless origins are configured."""

from __future__ import annotations

import gzip
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.services import start_front
from tests.conftest import Stack
from tests.secure_stack import ALLOWED_ORIGIN, LIMITS, MODEL, SecureStack, headers

pytestmark = pytest.mark.e2e


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3} | extra


def _turns(n: int) -> list[dict[str, str]]:
    roles = ["user", "assistant"] * n
    return [{"role": role, "content": "x"} for role in roles[: n - 1]] + [{"role": "user", "content": "x"}]


def _job_count(secure: SecureStack) -> int:
    return sum(1 for _ in secure.redis.client().scan_iter("streamq:job:*"))


CASES = [
    ("messages", _chat(messages=_turns(5)), "STREAMQ_MAX_MESSAGES", "messages"),
    (
        "history",
        {"model": MODEL, "prompt": "x", "history": [["q", "a"]] * 2, "max_tokens": 3},
        "STREAMQ_MAX_MESSAGES",
        "history",
    ),
    (
        "prompt chars",
        _chat(messages=[{"role": "user", "content": "y" * 601}]),
        "STREAMQ_MAX_PROMPT_CHARS",
        None,
    ),
    ("stop count", _chat(stop=["a", "b", "c"]), "STREAMQ_MAX_STOP_SEQUENCES", "stop"),
    ("stop length", _chat(stop="a" * 11), "STREAMQ_MAX_STOP_CHARS", "stop"),
    ("max_tokens", _chat(max_tokens=101), "STREAMQ_MAX_TOKENS_LIMIT", "max_tokens"),
]


# The job API takes every case; the OpenAI route those in messages form.
ROUTED = [("/v1/jobs", *case) for case in CASES] + [
    ("/v1/chat/completions", *case) for case in CASES if "messages" in case[1]
]


@pytest.mark.parametrize(
    ("path", "_name", "body", "setting", "param"), ROUTED, ids=[f"{r[0]} {r[1]}" for r in ROUTED]
)
def test_each_limit_is_a_400_naming_it_and_creates_no_job(
    secure: SecureStack, path: str, _name: str, body: dict[str, Any], setting: str, param: str | None
) -> None:
    before = _job_count(secure)
    r = httpx.post(f"{secure.a}{path}", json=body, headers=headers("ivan"), timeout=10)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert setting in error["message"] and error["code"] == "limit_exceeded"
    if param:
        assert error["param"] == param
    assert _job_count(secure) == before


def test_a_body_over_the_size_limit_is_413_with_or_without_a_length(secure: SecureStack) -> None:
    limit = int(LIMITS["STREAMQ_MAX_BODY_BYTES"])
    big = b'{"prompt": "' + b"z" * limit + b'"}'
    before = _job_count(secure)
    declared = httpx.post(
        f"{secure.a}/v1/jobs", content=big, headers=headers("judy") | {"Content-Type": "application/json"}
    )
    assert declared.status_code == 413
    assert "STREAMQ_MAX_BODY_BYTES" in declared.json()["error"]["message"]
    # Declared far past it (more than DRAIN_FACTOR times): refused at once, the body never read
    # (one declared within that is read and dropped first: a proxy's write must not break).
    host, port = secure.a.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        sent = ["POST /v1/jobs HTTP/1.1", f"Host: {host}", f"Content-Length: {9 * limit}"]
        sent += [f"{name}: {value}" for name, value in headers("judy").items()]
        raw.sendall(("\r\n".join(sent) + "\r\n\r\n").encode())
        assert raw.recv(4096).startswith(b"HTTP/1.1 413 ")

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    chunked = httpx.post(
        f"{secure.a}/", content=chunks(), headers=headers("judy") | {"Content-Type": "application/json"}
    )
    assert chunked.status_code == 413
    assert chunked.json()["error"]["code"] == "request_too_large"
    assert _job_count(secure) == before

    def small() -> Iterator[bytes]:  # a chunked body within the limit reaches its route whole
        yield b'{"prompt": "hi", '
        yield b'"max_length": 60}'

    ok = httpx.post(
        f"{secure.a}/", content=small(), headers=headers("judy") | {"Content-Type": "application/json"}
    )
    assert ok.status_code == 200 and ok.json()["status"] == 200


def test_a_compressed_body_is_a_415_naming_its_encoding_not_bad_json_or_plain(secure: SecureStack) -> None:
    body = json.dumps(_chat()).encode()
    before = _job_count(secure)
    for encoding, content in (("gzip", gzip.compress(body)), ("br", body), ("GZIP, identity", body)):
        sent = headers("judy") | {"Content-Type": "application/json", "Content-Encoding": encoding}
        r = httpx.post(f"{secure.a}/v1/chat/completions", content=content, headers=sent)
        assert r.status_code == 415, r.text
        error = r.json()["error"]
        assert error["code"] == "unsupported_content_encoding" and f"'{encoding}'" in error["message"]
    assert _job_count(secure) == before
    plain = headers("judy") | {"Content-Type": "application/json", "Content-Encoding": "identity"}
    assert httpx.post(f"{secure.a}/v1/chat/completions", content=body, headers=plain).status_code == 200


def test_the_prompt_token_limit_is_counted_with_the_workers_tokenizer(stack: Stack, tmp_path: Path) -> None:
    front, url = start_front(stack.env | {"STREAMQ_MAX_PROMPT_TOKENS": "40"}, tmp_path, "token-limit")
    try:
        model = stack.model_dir.name  # other tests' workers may serve other models beside it
        long = {"model": model, "messages": [{"role": "user", "content": "word " * 60}], "max_tokens": 2}
        r = httpx.post(f"{url}/v1/jobs", json=long, timeout=30)
        assert r.status_code == 400, r.text
        assert "STREAMQ_MAX_PROMPT_TOKENS" in r.json()["error"]["message"]
        assert "tokens" in r.json()["error"]["message"]
        short = {"model": model, "messages": [{"role": "user", "content": "word " * 5}], "max_tokens": 2}
        assert httpx.post(f"{url}/v1/jobs", json=short, timeout=30).status_code == 202
    finally:
        front.stop()


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(
        f"{url}/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
        timeout=10,
    )


def test_cors_is_off_by_default_and_allows_only_the_configured_origins(secure: SecureStack) -> None:
    default = _preflight(secure.a, ALLOWED_ORIGIN)
    assert "access-control-allow-origin" not in default.headers
    allowed = _preflight(secure.b, ALLOWED_ORIGIN)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = _preflight(secure.b, "https://evil.example.net")
    assert other.headers.get("access-control-allow-origin") != "https://evil.example.net"
    assert other.status_code == 400 and other.json()["error"]["code"] == "cors_not_allowed"  # the envelope
    assert "its origin" in other.json()["error"]["message"]
    simple = httpx.get(f"{secure.b}/v1/models", headers=headers("bob") | {"Origin": ALLOWED_ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
