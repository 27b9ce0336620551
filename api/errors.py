"""One error envelope for the whole API (OpenAI's): ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from api.validation_messages import param_of, relevant, where_at
from shared.job_store.vocabulary import EventName

log = logging.getLogger("streamq.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error's body (a 409 for an ended job also carries the ``job``)."""

    error: ErrorDetail


_MEANINGS = {
    400: "invalid request: `param` names the field",
    401: "no API key, or not a valid one",
    404: "no such job (or another key's), or model",
    409: "the job has already ended, or was canceled",
    413: "the request body is too large",
    415: "the body was not sent as JSON (its Content-Type)",
    429: "over a quota or a full queue: see Retry-After",
    502: "the job failed",
    503: "Redis is unreachable, or no live worker serves the model",
    504: "the job ran past its timeout",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with the envelope's schema."""
    return {status: {"model": ErrorResponse, "description": _MEANINGS[status]} for status in statuses}


class ApiError(Exception):
    """An error the API answers with, in the envelope, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "api_error")
        self.param = param
        self.code = code
        self.headers = headers
        self.body = body  # extra top-level members (e.g. the job view with a 409)

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.type, self.param, self.code) | (self.body or {})


def renamed(exc: ApiError, sent: str | None, prompt: str = "messages") -> ApiError:
    """``exc`` naming field ``sent`` (as the client sent it) where it named a job request's:
    its ``param``, its message's quotes, and a worker's message that names its field first;
    ``prompt``: what the route calls its prompt, where a length refusal (shared.limits) says
    "the messages"."""
    if prompt != "messages":
        for said in (" in the messages, ", "the messages resulted in", "length of the messages"):
            exc.message = exc.message.replace(said, said.replace("messages", prompt))
    if sent and exc.param and sent != exc.param:
        exc.message = exc.message.replace(f"'{exc.param}'", f"'{sent}'")
        if exc.message.startswith(f"{exc.param}: "):
            exc.message = sent + exc.message[len(exc.param) :]
        exc.param = sent
    return exc


def front_stopping(message: str) -> ApiError:
    """A 503 for a request that comes while the front stops: send it again (another front)."""
    retry = {"Retry-After": "1"}
    return ApiError(503, message, type="stream_interrupted", code="front_stopping", headers=retry)


def too_many_requests(message: str, code: str, retry_after: int) -> ApiError:
    """A 429 ``rate_limit_error`` that says when to come back (``Retry-After``, seconds)."""
    return ApiError(429, message, code=code, headers={"Retry-After": str(retry_after)})


def error_envelope(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.envelope(), status_code=exc.status, headers=exc.headers)


# Set in a request's scope by a route that reads any body as JSON (the seed's): a body it read
# that is not an object is then a 400, not a 415 for its Content-Type.
BODY_READ_AS_JSON = "streamq.body_read_as_json"


def _not_json(request: Request, errors: Sequence[Any]) -> ApiError | None:
    """The 415 for a body that was not read as JSON for want of a JSON Content-Type."""
    if request.scope.get(BODY_READ_AS_JSON):
        return None
    kind = request.headers.get("content-type", "")
    main, _, sub = kind.split(";")[0].strip().lower().partition("/")
    if main == "application" and (sub == "json" or sub.endswith("+json")):  # what FastAPI reads
        return None
    unread = ("body",), "model_attributes_type"
    if not any((tuple(e.get("loc", ())), e.get("type")) == unread for e in errors):
        return None
    sent = f"Content-Type '{kind}'" if kind else "no Content-Type"
    message = f"send the body as JSON, with 'Content-Type: application/json' (this request had {sent})"
    return ApiError(415, message)


def _validation_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if (wrong_type := _not_json(request, errors)) is not None:
        return error_response(wrong_type)
    if any(e.get("type") == "json_invalid" for e in errors):
        first = next(e for e in errors if e.get("type") == "json_invalid")
        detail = first.get("ctx", {}).get("error", "")
        message = f"the request body is not valid JSON: {detail}".rstrip(": ")
        return error_response(ApiError(400, message, code="invalid_json"))
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") == "missing" for e in errors):
        return error_response(ApiError(400, "the request body is missing or null: send a JSON object"))
    unknown = next((e for e in errors if e.get("type") == "extra_forbidden"), None)
    if unknown is not None:
        name = param_of(tuple(unknown.get("loc", ())))
        return error_response(
            ApiError(
                400,
                f"'{name}' is not a parameter of {request.method} {_shown_path(request.url.path)} "
                "(/docs lists its fields)",
                param=name,
                code="unsupported_parameter",
            )
        )
    messages = []
    errors = relevant(errors)
    for e in errors:
        where = param_of(tuple(e.get("loc", ())))
        text = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        messages.append(f"{where}: {text}" if where else text)
    first_param = where_at(errors[0]) if errors else None
    return error_response(ApiError(400, "; ".join(messages), param=first_param))


def _shown_path(path: str) -> str:
    return path if len(path) <= 200 else path[:200] + "…"


def _http_response(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405 and _OTHER_ROUTES.match(request.url.path):
        return error_response(unknown_url(request.method, request.url.path))
    if exc.status_code == 405:  # a known path, another method
        allowed = _allowed_methods(request)
        message = f"{request.method} is not allowed on {_shown_path(request.url.path)}"
        message += f" (allowed: {allowed})" if allowed else ""
        headers = {**(headers or {}), "Allow": allowed} if allowed else headers
        return error_response(ApiError(405, message, code="method_not_allowed", headers=headers))
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 400 and message == "There was an error parsing the body":
        # FastAPI's answer to a body json cannot even begin to read (not UTF-8, nested too deep):
        # the same 400 as any other body that is not JSON.
        return error_response(
            ApiError(
                400, "the request body is not valid JSON (not UTF-8, or nested too deep)", code="invalid_json"
            )
        )
    return error_response(ApiError(exc.status_code, message, headers=headers))


def _allowed_methods(request: Request) -> str:
    """Every method some route takes on this path (Starlette's Allow names the first route's
    only: ``/v1/jobs/{id}`` has GET and DELETE on two routes)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


def _no_such_route(fallback: ASGIApp) -> ASGIApp:
    """The router's answer when no route matches the path: a 404 in the envelope that names the
    method and path (OpenAI says ``Invalid URL (POST /v1/…)``), so a client of a route this
    server lacks (``/v1/embeddings``, say) learns why, as the openai SDK's ``NotFoundError``.
    A 404 from a route (an unknown job, a model not served) is that route's own."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await _no_websockets(WebSocket(scope, receive, send))
            return
        if scope["type"] != "http":
            await fallback(scope, receive, send)
            return
        raise unknown_url(scope["method"], scope["path"])

    return app


async def _no_websockets(websocket: WebSocket) -> None:
    """A WebSocket upgrade (the openai SDK's ``responses.connect()``, the Agents SDK's websocket
    transport) gets the same JSON 404 as a route this server lacks, where the server can send one
    (uvicorn's denial-response extension), rather than a bare 403 that reads as a refused key."""
    error = ApiError(
        404,
        f"Invalid URL (WebSocket {_shown_path(websocket.url.path)}): this server offers no WebSocket "
        "routes; stream over HTTP instead (stream=true: Server-Sent Events)",
        code="unknown_url",
    )
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(error_response(error))
    else:
        await websocket.close()


def unknown_url(method: str, path: str) -> ApiError:
    return ApiError(
        404,
        f"Invalid URL ({method} {_shown_path(path)}): "
        "this route is not offered by this server (/docs lists its routes)",
        code="unknown_url",
    )


# OpenAI routes whose path reads as one of ours with an id in it (``/v1/responses/{id}``):
# ``POST /v1/responses/input_tokens`` and ``/compact`` are routes this server lacks (404), not
# a response that takes other methods (405).
_OTHER_ROUTES = re.compile(r"^/v1/responses/(?!resp_)[^/]+$")


def _api_error_response(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


def _redis_response(request: Request, exc: Exception) -> JSONResponse:
    log.warning("Redis failed: %s", exc)
    metrics = getattr(request.app.state, "metrics", None)  # api.metrics.FrontMetrics
    if metrics is not None:
        metrics.redis_errors.inc()
    return error_response(
        ApiError(503, "the job store (Redis) is unavailable; try again shortly", headers={"Retry-After": "1"})
    )


def _unexpected_response(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        ApiError(500, "internal error; the failure is logged on the server", type="api_error")
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error_response)
    app.add_exception_handler(RequestValidationError, _validation_response)
    app.add_exception_handler(StarletteHTTPException, _http_response)
    app.add_exception_handler(redis.exceptions.RedisError, _redis_response)
    app.add_exception_handler(Exception, _unexpected_response)
    app.router.default = _no_such_route(app.router.default)


def job_failure_error(event: str, data: dict[str, Any]) -> ApiError:
    """The HTTP error for a job that ended without an answer (routes that wait for the answer)."""
    # The openai SDK sends a request again after a 409 or a 5xx, which queues a new job: not for a
    # job someone canceled, nor one that waited out its queue_ttl (it would wait again).
    final = {"x-should-retry": "false"}
    if event == EventName.CANCELED:
        return ApiError(409, "the job was canceled before it finished", code="job_canceled", headers=final)
    kind = str(data.get("type") or "generation_error")
    message = str(data.get("message") or "the job failed")
    # Past a time limit (the front's wait, the job's queue_ttl): 504; the worker failed it: 502.
    status = {"invalid_request_error": 400, "timeout": 504, "expired": 504, "stream_interrupted": 503}
    status_code = status.get(kind, 502)
    return ApiError(
        status_code,
        message,
        type=kind,
        param=data.get("param") or None,
        code=data.get("code") or None,
        headers=final if kind == "expired" else None,
    )
