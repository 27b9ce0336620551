"""A front behind nginx, configured with the README's own blocks (Deploying: "Behind a reverse
proxy"), read by the clients people use: the seed's streaming client (``requests``, one chunk at a
time), the openai SDK and httpx-sse. nginx passes a response on as it reads it, at most
``proxy_buffer_size`` at a time: the seed's client keeps the last ``<^>`` piece of each chunk, so
a chunk passed on in pieces left it with the tail of the answer (4 KB in, it got 2,625 bytes of
6,712). nginx and the front are on one host here, as the README's second block needs (across a
network a chunk may come in several reads, and no setting keeps it whole). A synthetic worker
answers fast with long answers (a word per token)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from httpx_sse import connect_sse
from openai import OpenAI

from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_synthetic_worker, wait_for
from streamq.processes import free_port
from tests.processes import ROOT

pytestmark = pytest.mark.e2e

MODEL = "proxied"


def readme_nginx_blocks() -> str:
    """The README's nginx configuration, as a user copies it."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```nginx\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 1, "the README has one nginx configuration"
    return str(blocks[0])


@dataclass
class Proxied:
    url: str  # nginx's
    front: str  # the front's own


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (.ci/run installs Debian's)")
    redis = RedisServer()
    logdir: Path = tmp_path_factory.mktemp("nginx")
    env = {"STREAMQ_REDIS_URL": redis.url, "STREAMQ_DRAIN_SECONDS": "0"}
    services: list[Service] = []
    proxy = None
    try:
        services.append(start_synthetic_worker(env, logdir, MODEL, "proxied-worker", 3000, 4))
        front, front_url = start_front(env, logdir, "proxied-front")
        services.append(front)
        port = free_port()
        upstream = front_url.removeprefix("http://")
        (logdir / "nginx.conf").write_text(
            f"""daemon off;
master_process off;
pid {logdir}/nginx.pid;
error_log {logdir}/nginx-error.log warn;
events {{}}
http {{
    access_log off;
    client_body_temp_path {logdir}/body;
    proxy_temp_path {logdir}/proxy;
    fastcgi_temp_path {logdir}/fastcgi;
    uwsgi_temp_path {logdir}/uwsgi;
    scgi_temp_path {logdir}/scgi;
    upstream streamq_fronts {{ server {upstream}; }}
    gzip on;  # as many servers have it on for their other sites
    gzip_types text/plain text/event-stream application/json;
    server {{
        listen 127.0.0.1:{port};
{readme_nginx_blocks()}
        location /llm/ {{  # the same fronts under a path prefix (the web page's paths are relative)
            proxy_pass http://streamq_fronts/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
        )
        proxy = subprocess.Popen([nginx, "-p", str(logdir), "-c", str(logdir / "nginx.conf")])
        url = f"http://127.0.0.1:{port}"

        def served() -> bool:
            assert proxy is not None and proxy.poll() is None, "nginx stopped (its configuration?)"
            try:
                models = httpx.get(f"{url}/v1/models", timeout=2).json()["data"]
            except (httpx.HTTPError, ValueError, KeyError):
                return False
            return MODEL in [m["id"] for m in models]

        wait_for(served, 60, "the worker, through nginx")
        yield Proxied(url, front_url)
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(10)
        for service in reversed(services):
            service.stop()
        redis.close()


def test_the_seeds_streaming_client_gets_the_whole_answer_through_nginx(proxied: Proxied) -> None:
    body: dict[str, Any] = {"prompt": "你好", "history": [], "max_length": 2048}  # about 12 KB of answer
    r = requests.post(f"{proxied.url}/stream", json=body, stream=True, timeout=60)
    answer = ""
    for chunk in r.iter_content(chunk_size=None):  # the README's client, as the seed's users wrote it
        answer = chunk.decode("utf-8").split("<^>")[-1]
    job = httpx.get(f"{proxied.front}/v1/jobs/{r.headers['x-streamq-job-id']}", timeout=10).json()
    assert job["status"] == "finished" and len(job["text"].encode()) > 10_000
    assert answer == job["text"]


def test_event_streams_arrive_whole_and_resume_through_nginx(proxied: Proxied) -> None:
    client = OpenAI(base_url=f"{proxied.url}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=800, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert len(text.split()) == 800
    job_id = httpx.post(
        f"{proxied.url}/v1/jobs", json={"model": MODEL, "prompt": "hi", "max_tokens": 800}, timeout=10
    ).json()["id"]
    seen: list[str] = []
    with httpx.Client(timeout=30) as http:
        with connect_sse(http, "GET", f"{proxied.url}/v1/jobs/{job_id}/events") as events:
            for event in events.iter_sse():
                seen.append(event.id)
                if len(seen) == 3:
                    break  # the client goes away, then comes back after its last event
        with connect_sse(
            http, "GET", f"{proxied.url}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": seen[-1]}
        ) as events:
            rest = list(events.iter_sse())
    assert rest[-1].event == "done" and not set(seen) & {e.id for e in rest}
    whole = httpx.get(f"{proxied.front}/v1/jobs/{job_id}/events", timeout=30).text
    assert [line for line in whole.splitlines() if line.startswith("id: ")] == [
        f"id: {i}" for i in seen + [e.id for e in rest]
    ]


def test_a_body_too_large_gets_the_fronts_json_refusal_through_nginx(proxied: Proxied) -> None:
    """nginx's own limit (1 MB by default) answered an HTML page: the README's blocks let the
    front's limit (STREAMQ_MAX_BODY_BYTES, 1 MiB) refuse it, in the envelope."""
    big = {"model": MODEL, "prompt": "x" * 1_100_000, "max_tokens": 1}
    refused = httpx.post(f"{proxied.url}/v1/jobs", json=big, timeout=30)
    assert refused.status_code == 413 and refused.headers["content-type"].startswith("application/json")
    assert refused.json()["error"]["code"] == "request_too_large"


def test_the_web_page_works_under_a_path_prefix(proxied: Proxied) -> None:
    """The page's files and its calls are relative to it: under /llm/, all of them stay there."""
    page = httpx.get(f"{proxied.url}/llm/", timeout=10)
    assert page.status_code == 200
    files = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert files and all(not f.startswith("/") for f in files if not f.startswith("data:")), files
    for name in files:
        if not name.startswith("data:"):
            assert httpx.get(f"{proxied.url}/llm/{name}", timeout=10).status_code == 200, name
    script = httpx.get(f"{proxied.url}/llm/static/chat.js", timeout=10).text
    called = re.findall(r'(?:api\("[A-Z]+", |fetch\()[`"]([^`"]+)', script)
    assert called and all(path.startswith("v1/") for path in called), called
    for path in ("v1/models",):
        assert MODEL in httpx.get(f"{proxied.url}/llm/{path}", timeout=10).text
