"""The floor under a submit, for the submits table's same-run baseline: the least a Python front
can do per job on this machine. A FastAPI app (uvicorn, as the front runs) whose ``POST /v1/jobs``
validates a small JSON body with pydantic, makes an id, writes one hash to Redis (one round trip,
through an asyncio pool as large as the front's) and answers 202 with a small JSON body. Its heap
is settled as a served front's is (frozen, with the front's young-generation threshold).

``python -m uvicorn bench.submit_floor:app --port P`` with ``STREAMQ_REDIS_URL`` set.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from pydantic import BaseModel

from shared.heap import settle_heap
from shared.settings import Settings


class Job(BaseModel):
    prompt: str
    max_tokens: int = 16
    model: str = ""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = Settings()
    pool = aioredis.BlockingConnectionPool.from_url(
        os.environ["STREAMQ_REDIS_URL"], max_connections=settings.redis_max_connections
    )
    app.state.redis = aioredis.Redis(connection_pool=pool)
    settle_heap(settings)
    try:
        yield
    finally:
        await app.state.redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.post("/v1/jobs", status_code=202)
async def submit(job: Job, request: Request) -> dict[str, object]:
    job_id = secrets.token_hex(16)
    created = time.time()
    fields = {"model": job.model, "request": job.model_dump_json(), "created_at": created}
    await request.app.state.redis.hset(f"floor:{job_id}", mapping=fields)
    return {"id": job_id, "status": "queued", "model": job.model, "created_at": created}


@app.get("/health")
async def healthz() -> dict[str, bool]:
    return {"ok": True}
