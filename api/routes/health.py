"""Liveness and readiness probes."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api.state import Front, get_front

log = logging.getLogger("streamq.api")
router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (it says nothing of Redis or workers)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready"}})
async def readyz(front: Annotated[Front, Depends(get_front)]) -> JSONResponse:
    """Ready: Redis answers and each served model has a live worker."""
    body: dict[str, Any] = {"ready": False, "redis": False, "models": {}}
    try:
        await front.redis.ping()
        body["redis"] = True
        ready, models = await front.directory.readiness()
        body["ready"] = ready
        body["models"] = models
    except RedisError as exc:  # the details (addresses) go to the log, not to anyone who asks
        log.warning("readyz: Redis is unreachable: %s", exc)
        body["error"] = "Redis is unreachable"
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
