"""API keys: every route but health, readiness and metrics wants a valid Bearer key; a job is seen
only by its own key (another key gets 404); the front will not start open on a public address."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import ApiKeys, bearer_token, open_bind_refusal
from shared.settings import Settings
from streamq.processes import free_port
from tests.processes import ROOT
from tests.secure_stack import FILE_KEY, KEYS, MODEL, SecureStack, headers

pytestmark = pytest.mark.e2e

SHORT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
OPEN_ROUTES = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}
FAKE_ID = "0" * 32


def _paced(send: Callable[[], httpx.Response]) -> httpx.Response:
    """``send()``, again after its Retry-After while the key is over its request rate (the setup
    requests of these tests count toward alice's small rate too), as a client does."""
    for _ in range(5):
        r = send()
        if r.status_code != 429:
            return r
        time.sleep(float(r.headers.get("Retry-After", "1")))
    return r


def _submit(url: str, who: str, body: dict[str, Any] = SHORT) -> str:
    r = _paced(lambda: httpx.post(f"{url}/v1/jobs", json=body, headers=headers(who), timeout=10))
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _finish(url: str, who: str, job_id: str) -> None:
    with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers(who), timeout=30) as r:
        r.read()


# Each route: how to call it with these headers, given a job of the right key (job routes only).
Call = Callable[[str, dict[str, str], str], httpx.Response]


def _job_route(method: str, suffix: str) -> Call:
    def call(url: str, hdrs: dict[str, str], job_id: str) -> httpx.Response:
        if method == "GET" and suffix == "/events":
            with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=hdrs, timeout=30) as r:
                r.read()
                return r
        return httpx.request(method, f"{url}/v1/jobs/{job_id}{suffix}", headers=hdrs, timeout=30)

    return call


def _post(path: str, body: dict[str, Any]) -> Call:
    def call(url: str, hdrs: dict[str, str], _job_id: str) -> httpx.Response:
        return httpx.post(f"{url}{path}", json=body, headers=hdrs, timeout=30)

    return call


def _response_route(method: str, suffix: str) -> Call:
    def call(url: str, hdrs: dict[str, str], response_id: str) -> httpx.Response:
        return httpx.request(method, f"{url}/v1/responses/{response_id}{suffix}", headers=hdrs, timeout=30)

    return call


def _get(path: str) -> Call:
    def call(url: str, hdrs: dict[str, str], _job_id: str) -> httpx.Response:
        return httpx.get(f"{url}{path}", headers=hdrs, timeout=30)

    return call


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
ROUTES: dict[tuple[str, str], Call] = {
    ("POST", "/v1/jobs"): _post("/v1/jobs", SHORT),
    ("GET", "/v1/jobs/{job_id}"): _job_route("GET", ""),
    ("GET", "/v1/jobs/{job_id}/events"): _job_route("GET", "/events"),
    ("POST", "/v1/jobs/{job_id}/cancel"): _job_route("POST", "/cancel"),
    ("DELETE", "/v1/jobs/{job_id}"): _job_route("DELETE", ""),
    ("POST", "/v1/chat/completions"): _post("/v1/chat/completions", CHAT),
    ("POST", "/v1/completions"): _post("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3}),
    ("GET", "/v1/models"): _get("/v1/models"),
    ("GET", "/v1/models/{model}"): _get(f"/v1/models/{MODEL}"),
    ("POST", "/"): _post("/", {"prompt": "hi", "history": [], "max_length": 60}),
    ("POST", "/stream"): _post("/stream", {"prompt": "hi", "history": [], "max_length": 60}),
    ("POST", "/v1/responses"): _post(
        "/v1/responses", {"model": MODEL, "input": "hi", "max_output_tokens": 3}
    ),
    ("GET", "/v1/responses/{response_id}"): _response_route("GET", ""),
    ("GET", "/v1/responses/{response_id}/input_items"): _response_route("GET", "/input_items"),
    ("POST", "/v1/responses/{response_id}/cancel"): _response_route("POST", "/cancel"),
    ("DELETE", "/v1/responses/{response_id}"): _response_route("DELETE", ""),
}
JOB_ROUTES = [route for route in ROUTES if "{job_id}" in route[1]]
RESPONSE_ROUTES = [route for route in ROUTES if "{response_id}" in route[1]]
_read_only: dict[str, str] = {}  # one response of each owner for the routes that only read it


def _response_for(route: tuple[str, str], url: str, owner: str) -> str:
    """A response of ``owner`` (a long one to cancel or delete; the reading routes share one, as
    the key's request rate is small here)."""
    if route[0] == "GET" and owner in _read_only:
        return _read_only[owner]
    body = {
        "model": MODEL,
        "input": "hi",
        "background": True,
        "max_output_tokens": 100 if route[0] != "GET" else 3,
    }
    r = _paced(lambda: httpx.post(f"{url}/v1/responses", json=body, headers=headers(owner), timeout=10))
    assert r.status_code == 200, r.text
    if route[0] == "GET":
        _read_only[owner] = r.json()["id"]
    return str(r.json()["id"])


def _job_for(route: tuple[str, str], url: str, owner: str) -> str:
    """A job of ``owner`` for a job route (a long one to cancel), a response for a response
    route, or '' for the other routes."""
    if route in RESPONSE_ROUTES:
        return _response_for(route, url, owner)
    if route not in JOB_ROUTES:
        return ""
    return _submit(url, owner, LONG if route[0] != "GET" else SHORT)


def _is_authentication_error(r: httpx.Response) -> bool:
    return (
        r.status_code == 401
        and r.json()["error"]["type"] == "authentication_error"
        and r.headers.get("www-authenticate") == "Bearer"
    )


def test_the_matrix_covers_every_route_of_the_api(secure: SecureStack) -> None:
    schema = httpx.get(f"{secure.a}/openapi.json", timeout=10).json()
    served = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
    assert served - OPEN_ROUTES - set(ROUTES) == set(), "a route is missing from the auth matrix"


@pytest.mark.parametrize("route", list(ROUTES), ids=lambda r: f"{r[0]} {r[1]}")
def test_no_key_and_a_bad_key_get_401_and_the_right_key_gets_2xx(
    secure: SecureStack, route: tuple[str, str]
) -> None:
    call, job_id = ROUTES[route], _job_for(route, secure.a, "alice")
    assert _is_authentication_error(call(secure.a, {}, job_id))
    assert _is_authentication_error(call(secure.a, {"Authorization": "Bearer sk-not-a-key"}, job_id))
    assert _is_authentication_error(call(secure.a, {"Authorization": f"Basic {KEYS['alice']}"}, job_id))
    good = _paced(lambda: call(secure.a, headers("alice"), job_id))
    assert 200 <= good.status_code < 300, good.text


@pytest.mark.parametrize("route", JOB_ROUTES, ids=lambda r: f"{r[0]} {r[1]}")
def test_another_keys_job_is_not_found(secure: SecureStack, route: tuple[str, str]) -> None:
    job_id = _job_for(route, secure.a, "gina")
    stolen = ROUTES[route](secure.b, headers("bob"), job_id)
    missing = ROUTES[route](secure.b, headers("bob"), FAKE_ID)
    assert stolen.status_code == missing.status_code == 404
    assert stolen.json()["error"] == missing.json()["error"] | {"message": f"no job with id '{job_id}'"}
    view = httpx.get(f"{secure.a}/v1/jobs/{job_id}", headers=headers("gina"), timeout=10).json()
    if view["status"] in ("queued", "running"):  # untouched by bob; let it go
        httpx.post(f"{secure.a}/v1/jobs/{job_id}/cancel", headers=headers("gina"), timeout=10)


def test_another_key_cannot_cancel_a_running_job(secure: SecureStack) -> None:
    job_id = _submit(secure.a, "gina", LONG)
    r = httpx.post(f"{secure.b}/v1/jobs/{job_id}/cancel", headers=headers("bob"), timeout=10)
    assert r.status_code == 404
    view = httpx.get(f"{secure.a}/v1/jobs/{job_id}", headers=headers("gina"), timeout=10).json()
    assert view["status"] in ("queued", "running")
    httpx.post(f"{secure.a}/v1/jobs/{job_id}/cancel", headers=headers("gina"), timeout=10)


def test_a_rotated_key_of_the_same_name_reaches_its_jobs_and_file_keys_work(secure: SecureStack) -> None:
    job_id = _submit(secure.a, "alice")
    _finish(secure.a, "alice", job_id)
    r = httpx.get(f"{secure.b}/v1/jobs/{job_id}", headers=headers("alice2"), timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "finished"
    carol = {"Authorization": f"Bearer {FILE_KEY[1]}"}
    r = httpx.post(f"{secure.a}/v1/jobs", json=SHORT, headers=carol, timeout=10)
    assert r.status_code == 202
    assert httpx.get(f"{secure.a}/v1/jobs/{job_id}", headers=carol, timeout=10).status_code == 404


def test_health_readiness_and_the_schema_are_open(secure: SecureStack) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json", "/metrics"):
        assert httpx.get(f"{secure.a}{path}", timeout=10).status_code == 200, path
    for path in ("/healthz", "/readyz"):  # load balancers' checks often send HEAD
        r = httpx.head(f"{secure.a}{path}", timeout=10)
        assert r.status_code == 200 and r.content == b"", path


def test_without_a_key_nothing_else_is_learned(secure: SecureStack) -> None:
    """The key is checked before routing and before the body is read."""
    bad_json = httpx.post(
        f"{secure.a}/v1/jobs", content=b"{bad", headers={"Content-Type": "application/json"}, timeout=10
    )
    assert _is_authentication_error(bad_json)
    assert _is_authentication_error(httpx.get(f"{secure.a}/v1/no-such-route", timeout=10))
    assert _is_authentication_error(httpx.post(f"{secure.a}/", json={"prompt": "hi"}, timeout=10))
    with_key = httpx.post(
        f"{secure.a}/v1/jobs", content=b"{bad", headers=headers("bob") | {"Content-Type": "application/json"}
    )
    assert with_key.status_code == 400 and with_key.json()["error"]["code"] == "invalid_json"


def test_the_openai_sdk_authenticates_with_its_api_key(secure: SecureStack) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{secure.a}/v1", api_key=KEYS["bob"], max_retries=0)
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert answer.choices[0].finish_reason == "length"
    stranger = openai.OpenAI(base_url=f"{secure.a}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_logs_hold_no_key_and_no_prompt_unless_prompt_logging_is_on(secure: SecureStack) -> None:
    quiet, loud = "the-secret-prompt-3141", "the-logged-prompt-2718"
    for url, text in ((secure.a, quiet), (secure.b, loud)):
        body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 3}
        _finish(url, "erin", _submit(url, "erin", body))
    logs = {service.name: service.log() for service in secure.services}
    assert all(key not in log for key in KEYS.values() for log in logs.values())
    assert all(quiet not in log for log in logs.values())
    assert loud in logs["secure-b"], "STREAMQ_LOG_PROMPTS=1 logs the prompt"
    assert "by erin" in logs["secure-a"], "logs name the key, never show it"


# ----- settings, without a server ---------------------------------------------------------------
LONG_KEY = "sk-0123456789abcdef"


def test_keys_are_parsed_named_and_compared_by_digest(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nops:sk-file-key-00000001\n\nsk-unnamed-key-0000002\n")
    settings = Settings(
        api_keys="web:sk-env-key-000000001, sk-env-key-000000002",
        api_keys_file=keys_file,
    )
    keys = ApiKeys.from_settings(settings)
    assert len(keys) == 4
    assert keys.identify("sk-env-key-000000001") == "web" and keys.identify("sk-file-key-00000001") == "ops"
    unnamed = keys.identify("sk-env-key-000000002")
    assert unnamed is not None and unnamed.startswith("key-") and "sk-env" not in unnamed
    assert keys.identify("sk-env-key-00000000") is None and keys.identify("") is None
    assert "sk-env-key-000000001" not in repr(settings)
    assert bearer_token("Bearer  abc ") == "abc" and bearer_token("bearer abc") == "abc"
    assert bearer_token("Token abc") is None and bearer_token("Bearer ") is None


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"api_keys": "sk-short"}, "is 8 characters long; use at least 16"),
        ({"api_keys": "alice:"}, "alice is 0 characters long"),
        ({"api_keys": "abc:sk-0123456789"}, "abc is 13 characters"),  # a ':' names the key
    ],
)
def test_keys_too_short_to_be_safe_are_refused(env: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        ApiKeys.from_settings(Settings(**env))


def test_a_keys_file_without_keys_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        ApiKeys.from_settings(Settings(api_keys_file=empty))


@pytest.mark.parametrize(
    ("host", "env", "refused"),
    [
        ("127.0.0.1", {}, False),
        ("localhost", {}, False),
        ("::1", {}, False),
        ("0.0.0.0", {}, True),
        ("10.1.2.3", {}, True),
        ("0.0.0.0", {"insecure": True}, False),
        ("0.0.0.0", {"api_keys": LONG_KEY}, False),
    ],
)
def test_without_keys_only_loopback_binds_are_allowed(host: str, env: dict[str, Any], refused: bool) -> None:
    settings = Settings(**env)
    reason = open_bind_refusal(settings, ApiKeys.from_settings(settings), host)
    assert (reason is not None) == refused
    if refused:
        assert reason is not None and "--insecure" in reason and "STREAMQ_API_KEYS" in reason


def _run_api(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamq", "api", *args],
        env={"PATH": "/usr/bin:/bin", "STREAMQ_REDIS_URL": "redis://127.0.0.1:1/0", **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (["--host", "0.0.0.0"], {}, "--insecure"),
        ([], {"STREAMQ_API_KEYS_FILE": "/nonexistent/keys"}, "STREAMQ_API_KEYS_FILE"),
        ([], {"STREAMQ_API_KEYS": "sk-too-short"}, "at least 16"),
        ([], {"STREAMQ_KEY_RATE_LIMIT": "lots"}, "STREAMQ_KEY_RATE_LIMIT"),
    ],
)
def test_the_front_refuses_to_start_open_or_with_unusable_security_settings(
    args: list[str], env: dict[str, str], says: str
) -> None:
    result = _run_api([*args, "--port", str(free_port())], env)
    assert result.returncode == 2
    assert "refusing to start" in result.stderr and says in result.stderr
    assert "Traceback" not in result.stderr
