"""streamq's Python client: submit jobs, follow their events (resumed by themselves after a drop),
wait for answers, cancel. ``StreamqClient`` for plain code, ``AsyncStreamqClient`` for asyncio.

    from client import StreamqClient

    with StreamqClient("http://127.0.0.1:8000") as sq:
        job = sq.submit([{"role": "user", "content": "Hello!"}], max_tokens=64)
        for event in sq.events(job.id):
            print(event.text, end="", flush=True)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.async_client import AsyncStreamqClient
    from client.errors import StreamqConnectionError, StreamqError
    from client.resume import Backoff
    from client.sync_client import StreamqClient
    from shared.schemas import ChatMessage, JobView, StreamEvent

# Imported on first use, so that `streamq worker` (whose parser lists `chat`) loads no httpx.
_HOMES = {
    "AsyncStreamqClient": "client.async_client",
    "Backoff": "client.resume",
    "ChatMessage": "shared.schemas",
    "JobView": "shared.schemas",
    "StreamEvent": "shared.schemas",
    "StreamqClient": "client.sync_client",
    "StreamqConnectionError": "client.errors",
    "StreamqError": "client.errors",
}
__all__ = [
    "AsyncStreamqClient",
    "Backoff",
    "ChatMessage",
    "JobView",
    "StreamEvent",
    "StreamqClient",
    "StreamqConnectionError",
    "StreamqError",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
