"""The FastAPI application: ``create_app(settings)`` (uvicorn: ``api.app:create_app --factory``)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from api.auth import ApiKeys, RequireApiKey
from api.body_limit import BodySizeLimit
from api.cli import MULTIPROC_ENV
from api.cors import EnvelopeCORS
from api.error_counts import count_errors
from api.errors import install_error_handlers
from api.job_client import JobClient
from api.metrics import FrontMetrics
from api.metrics import router as metrics_router
from api.redis_job_client import RedisJobClient
from api.routes import compat, health, jobs, openai_api, responses
from api.routes import web as web_page
from api.shutdown import end_streams_when_stopping
from shared.heap import release_heap, settle_heap
from shared.settings import Settings
from shared.settings_loading import load_settings

log = logging.getLogger("streamq.api")


JobClientOpener = Callable[[Settings, FrontMetrics], Awaitable[JobClient]]


def create_app(
    settings: Settings | None = None,
    api_keys: ApiKeys | None = None,
    open_jobs: JobClientOpener = RedisJobClient.open,
    settle_heap_at_start: bool = False,
    end_streams_on_stop: bool = False,
) -> FastAPI:
    """The front. ValueError when the keys cannot be used (an unreadable keys file, a short
    key): better not to start than to start open. ``open_jobs`` opens the job system behind the
    routes in the app's lifespan (Redis and RQ; the fast tests give an in-memory one).
    ``settle_heap_at_start``: a served front's process (``streamq api``) freezes its start-up
    heap out of the garbage collector's sight once the job system is open.
    ``end_streams_on_stop``: served by ``streamq api``, a SIGTERM ends the open streams before
    uvicorn's grace runs out (``api/shutdown.py``)."""
    settings = settings or load_settings()
    api_keys = api_keys if api_keys is not None else ApiKeys.from_settings(settings)
    # This app's own registry, served on /metrics; shared by the processes of `--workers N`.
    front_metrics = FrontMetrics(multiprocess_dir=os.environ.get(MULTIPROC_ENV) or None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        jobs = await open_jobs(settings, front_metrics)
        app.state.jobs = jobs
        if settle_heap_at_start:
            settle_heap(settings)
        unchain = end_streams_when_stopping(jobs, settings.shutdown_grace) if end_streams_on_stop else None
        if api_keys.enabled:
            log.info("API keys required (%d configured)", len(api_keys))
        elif os.environ.get("STREAMQ_API_KEY"):  # the client's variable, set for the server's
            log.warning(
                "no API keys configured: the API is open to anyone who reaches it (STREAMQ_API_KEY "
                "is the clients' key; the front's keys are STREAMQ_API_KEYS)"
            )
        else:
            log.warning("no API keys configured: the API is open to anyone who reaches it")
        try:
            yield
        finally:
            if unchain is not None:
                unchain()
            await jobs.close()
            if settle_heap_at_start:
                release_heap()

    app = FastAPI(
        title="streamq",
        version="0.1.0",
        summary="Queue-backed chat LLM serving: jobs in Redis (RQ), output streamed from GPU workers.",
        lifespan=lifespan,
        # A path with a trailing slash is not a route here: a 404 in the envelope that names it,
        # not a bodiless 307 (which a client following it would send again, body and all).
        redirect_slashes=False,
    )
    app.state.api_keys = api_keys
    app.state.metrics = front_metrics
    install_error_handlers(app)
    app.openapi = _without_validation_errors(app.openapi)  # type: ignore[method-assign]
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequireApiKey, keys=api_keys)  # added last: runs first
    if settings.cors_origin_list():
        # Off unless origins are configured: browsers then refuse cross-origin calls.
        app.add_middleware(
            EnvelopeCORS,
            allow_origins=settings.cors_origin_list(),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Last-Event-ID",
                "X-Streamq-Detach",
                "Idempotency-Key",
            ],
            expose_headers=["X-Streamq-Job-Id", "Location", "Retry-After", "Idempotent-Replayed"],
            max_age=600,
        )
    app.add_middleware(count_errors, counter=front_metrics.api_errors)  # added last: sees every answer
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.include_router(compat.router)
    app.include_router(openai_api.router)
    app.include_router(responses.router)
    app.include_router(metrics_router)  # open, like /healthz and /readyz
    app.include_router(web_page.router)  # GET / and /static/*: the chat page (open, no API key)
    return app


def _without_validation_errors(build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """The OpenAPI document without FastAPI's 422 "Validation Error" on every route: a field that
    fails validation is a 400 in the envelope here, and so is a body that is not JSON."""

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI's, made once and kept
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        schemas = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):  # only the 422s named them
            schemas.pop(unused, None)
        return schema

    return openapi
