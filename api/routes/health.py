"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from api.job_client import JobClient, get_jobs

router = APIRouter(tags=["health"])


@router.api_route("/healthz", methods=["GET", "HEAD"])
async def healthz() -> dict[str, str]:
    """The process is up (it says nothing of Redis or workers)."""
    return {"status": "ok"}


@router.api_route("/readyz", methods=["GET", "HEAD"], responses={503: {"description": "not ready"}})
async def readyz(jobs: Annotated[JobClient, Depends(get_jobs)]) -> JSONResponse:
    """Ready: Redis answers and each served model has a live worker."""
    body: dict[str, Any] = await jobs.readiness()
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
