"""Text holding U+2028, U+2029, U+0085, CR+LF pairs and lone CRs reaches every client whole
(issue 19): SSE lines end at CR, LF or CRLF only, and the front sends the three separators
escaped inside event JSON, so a client that splits on them too loses nothing either."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from harness.services import Service, start_synthetic_worker, wait_for
from streamq.async_client import AsyncStreamqClient
from streamq.sse import LineSplitter, SSEParser
from streamq.sync_client import StreamqClient
from tests.conftest import Stack
from tests.separator_text import EXPECTED, MODEL, TEXT, TOKENS


def test_sse_lines_end_at_cr_lf_and_crlf_only_across_any_chunking() -> None:
    stream = 'id: 1\r\nevent: delta\rdata: {"text":"x\u2028y\u2029z\x85w"}\n\nid: 2\r\ndata: {}\r\n\r\n'
    want = ["id: 1", "event: delta", 'data: {"text":"x\u2028y\u2029z\x85w"}', "", "id: 2", "data: {}", ""]
    for size in (1, 2, 3, 7, len(stream)):  # a CRLF cut between two chunks is still one line end
        splitter = LineSplitter()
        lines = [line for i in range(0, len(stream), size) for line in splitter.feed(stream[i : i + size])]
        assert [*lines, *splitter.close()] == want, size
    parser = SSEParser()
    events = [e for line in want if (e := parser.feed(line)) is not None]
    assert events[0].data["text"] == "x\u2028y\u2029z\x85w"


@pytest.fixture(scope="module")
def separators_worker(stack: Stack) -> Iterator[Service]:
    env = {**stack.env, "STREAMQ_SYNTHETIC_TEXT": TEXT}
    worker = start_synthetic_worker(env, stack.logdir, MODEL, "separators-1", tokens_per_second=200)
    try:
        wait_for(lambda: httpx.get(f"{stack.url}/readyz").json()["models"].get(MODEL, 0) == 1, 60, "worker")
        yield worker
    finally:
        worker.stop()


@pytest.mark.e2e
def test_the_front_escapes_the_separators_and_the_clients_get_the_text_byte_for_byte(
    stack: Stack, separators_worker: Service
) -> None:
    assert len(EXPECTED) == TOKENS * 4 and "\u2028" in EXPECTED and "\x85" in EXPECTED
    with StreamqClient(stack.url) as client:
        job = client.submit(prompt="hi", model=MODEL, max_tokens=TOKENS)
        events = list(client.events(job.id))
        assert "".join(e.data["text"] for e in events if e.event == "delta") == EXPECTED
        assert client.status(job.id).text == EXPECTED
        raw = httpx.get(f"{stack.url}/v1/jobs/{job.id}/events", timeout=30).text
        assert "\\u2028" in raw and "\u2028" not in raw and "\x85" not in raw and "\u2029" not in raw

    async def read_async() -> str:
        async with AsyncStreamqClient(stack.url2) as client:
            job = await client.submit(prompt="hi", model=MODEL, max_tokens=TOKENS)
            return "".join([e.data["text"] async for e in client.events(job.id) if e.event == "delta"])

    assert asyncio.run(read_async()) == EXPECTED

    ask = [sys.executable, "-m", "streamq", "ask", "--url", stack.url, "--model", MODEL]
    done = subprocess.run([*ask, "--max-tokens", str(TOKENS), "hi"], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == EXPECTED.encode() + b"\n"  # plain text in a pipe, plus the last newline
