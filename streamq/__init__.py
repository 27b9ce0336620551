"""streamq's Python client: submit jobs, follow their events (resumed by themselves after a drop),
wait for answers, cancel. ``StreamqClient`` for plain code, ``AsyncStreamqClient`` for asyncio.

    from streamq import StreamqClient

    with StreamqClient("http://127.0.0.1:8000") as sq:
        job = sq.submit([{"role": "user", "content": "Hello!"}], max_tokens=64)
        for event in sq.events(job.id):
            print(event.text, end="", flush=True)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.schemas import ChatMessage, JobView, StreamEvent
    from streamq.async_client import AsyncStreamqClient
    from streamq.errors import StreamqConnectionError, StreamqError, StreamqJobError
    from streamq.resume import Backoff
    from streamq.sync_client import StreamqClient

# Imported on first use, so that `streamq worker` (whose parser lists `chat`) loads no httpx.
_HOMES = {
    "AsyncStreamqClient": "streamq.async_client",
    "Backoff": "streamq.resume",
    "ChatMessage": "shared.schemas",
    "JobView": "shared.schemas",
    "StreamEvent": "shared.schemas",
    "StreamqClient": "streamq.sync_client",
    "StreamqConnectionError": "streamq.errors",
    "StreamqError": "streamq.errors",
    "StreamqJobError": "streamq.errors",
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
    "StreamqJobError",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'streamq' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
