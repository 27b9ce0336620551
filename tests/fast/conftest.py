"""The fast tier: the real FastAPI app, in process, over an in-memory job system
(``MemoryJobClient``), driven through ``httpx.ASGITransport``. No Redis, no worker, no model."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import anyio
import httpx
import pytest
from openai import AsyncOpenAI

from api.app import create_app
from api.auth import ApiKeys
from shared.settings import Settings
from tests.fast.memory_jobs import MemoryJobClient

KEY_A = "sk-fast-tier-key-aaaaaaaaaaaaaaaa"
KEY_B = "sk-fast-tier-key-bbbbbbbbbbbbbbbb"


@dataclass
class Front:
    http: httpx.AsyncClient
    jobs: MemoryJobClient


def openai_of(front: Front) -> AsyncOpenAI:
    """The official SDK's async client on this front (no retries: a test sees each answer)."""
    transport = front.http._transport  # the app's ASGI transport
    http = httpx.AsyncClient(transport=transport, base_url="http://front/v1")
    return AsyncOpenAI(
        api_key="unused",
        base_url="http://front/v1",
        # openai 3 takes an httpx client as well as an httpx2 one (it checks for both), but its
        # annotation names httpx2's alone.
        http_client=http,  # type: ignore[arg-type]
        max_retries=0,
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def settled(condition: Callable[[], bool], within: float = 1.0) -> None:
    """Wait for work the front spawned and does not wait for (a cancel): fails past ``within``."""
    for _ in range(int(within / 0.01)):
        if condition():
            return
        await anyio.sleep(0.01)
    assert condition(), "not settled in time"


def _settings(**changes: object) -> Settings:
    return Settings().model_copy(update={"ping_interval": 0.2, **changes})


async def open_front(settings: Settings, keys: ApiKeys) -> AsyncIterator[Front]:
    app = create_app(settings, keys, open_jobs=MemoryJobClient.opener())
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://front") as http:
            yield Front(http, app.state.jobs)


@pytest.fixture
async def front() -> AsyncIterator[Front]:
    """An open front (no API keys)."""
    async for opened in open_front(_settings(), ApiKeys([])):
        yield opened


@pytest.fixture
async def keyed() -> AsyncIterator[Front]:
    """A front with two API keys, ``a`` and ``b``."""
    async for opened in open_front(_settings(), ApiKeys([("a", KEY_A), ("b", KEY_B)])):
        yield opened


@pytest.fixture
async def limited() -> AsyncIterator[Front]:
    """A front with small limits: 16 answer tokens, 2 stop sequences, 4 KiB bodies."""
    settings = _settings(max_tokens_limit=16, max_stop_sequences=2, max_body_bytes=4096)
    async for opened in open_front(settings, ApiKeys([])):
        yield opened
