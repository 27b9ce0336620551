"""The web chat page: ``GET /`` and its files under ``/static/`` (plain HTML, JS and CSS shipped in
the package; no build step, nothing fetched from elsewhere). These routes are open: the page asks
for the API key itself and sends it as a Bearer token with its calls to the job API.

``POST /`` is the seed's API (api/routes/compat.py); this router only answers ``GET /``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.errors import ApiError

router = APIRouter(tags=["web"])

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
_MEDIA_TYPES = {
    "chat.js": "text/javascript; charset=utf-8",
    "chat.css": "text/css; charset=utf-8",
}
# The page runs only its own script and talks only to this front; model text is never HTML.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/", include_in_schema=False)
async def chat_page() -> FileResponse:
    """The chat page."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/static/{name}", include_in_schema=False, responses={404: {}})
async def static_file(name: str) -> FileResponse:
    """The page's script and style sheet (only those: no directory is served)."""
    media_type = _MEDIA_TYPES.get(name)
    if media_type is None:
        raise ApiError(404, f"no static file '{name}'", param="name")
    return FileResponse(STATIC_DIR / name, media_type=media_type, headers=_HEADERS)
