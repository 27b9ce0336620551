"""The FastAPI application: ``create_app(settings)`` (uvicorn: ``api.app:create_app --factory``)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.routes import compat, health, jobs, openai_api
from api.routes import web as web_page
from api.state import Front
from shared.settings import Settings, load_settings

log = logging.getLogger("streamq.api")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        front = await Front.open(settings)
        app.state.front = front
        try:
            yield
        finally:
            await front.close()

    app = FastAPI(
        title="streamq",
        version="0.1.0",
        summary="Queue-backed chat LLM serving: jobs in Redis (RQ), output streamed from GPU workers.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(jobs.router)
    app.include_router(health.router)
    app.include_router(compat.router)
    app.include_router(openai_api.router)
    app.include_router(web_page.router)  # GET / and /static/*: the chat page (open, no API key)
    return app
