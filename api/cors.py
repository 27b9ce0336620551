"""CORS (off unless ``STREAMQ_CORS_ORIGINS`` names origins): Starlette's middleware, with a refused
preflight answered in the API's error envelope, as every other 4xx, instead of plain text."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from api.errors import ApiError, error_response


class EnvelopeCORS(CORSMiddleware):
    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code != 400:
            return answer
        refused = bytes(answer.body).decode()  # "Disallowed CORS origin, method, headers"
        what = refused.removeprefix("Disallowed CORS ")
        message = (
            f"this cross-origin request is refused: its {what} is not allowed here "
            "(STREAMQ_CORS_ORIGINS lists the origins that may call this API)"
        )
        kept = {k: v for k, v in answer.headers.items() if k.lower().startswith("access-control-")}
        kept["Vary"] = answer.headers.get("vary", "Origin")
        return error_response(ApiError(400, message, code="cors_not_allowed", headers=kept))
