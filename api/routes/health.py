"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.job_client import JobsDep

router = APIRouter(tags=["health"])


# HEAD as GET (load balancers' checks often send it), left out of the schema: one operation per
# route there, with a stable operationId.
@router.get("/healthz")
@router.head("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    """The process is up (it says nothing of Redis or workers)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready"}})
@router.head("/readyz", include_in_schema=False)
async def readyz(jobs: JobsDep) -> JSONResponse:
    """Ready: Redis answers and each served model has a live worker."""
    body: dict[str, Any] = await jobs.readiness()
    return JSONResponse(body, status_code=200 if body["ready"] else 503)
