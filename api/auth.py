"""API keys: ``Authorization: Bearer KEY`` on every route but a few open ones (``OPEN_PATHS``).

Checked by an ASGI middleware before routing, so a route is protected unless listed as open
(a new route cannot be forgotten), and a request without a key learns nothing else (not even
whether its body parses). Keys come from ``STREAMQ_API_KEYS`` (comma-separated) and
``STREAMQ_API_KEYS_FILE`` (one per line, ``#`` comments); each entry is ``KEY`` or ``name:KEY``
(so an unnamed key holds no ``:``), at least MIN_KEY_LENGTH characters. Only SHA-256 digests
are kept in memory, and a presented key is compared with every one of them in constant time.
A key's name (given, or ``key-`` + the start of its digest) is who it is: it owns the jobs it
creates, its quotas are counted under it, and logs show it instead of the key. Two keys may
share a name (rotation: the new key still reaches the old key's jobs).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import ApiError, error_response
from shared.settings import Settings

OPEN = ""  # the caller's name when the server runs without keys
MIN_KEY_LENGTH = 16
# Open to anyone: the probes, the metrics, the API's description, and the web chat page (which
# asks for the key itself). Everything else wants a key.
OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/scaling",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
    }
)
OPEN_GET_PREFIXES = ("/static/",)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key's name, or OPEN when no keys are configured."""

    name: str


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _entries(text: str, separator: str) -> list[str]:
    lines = (line.strip() for line in text.split(separator))
    return [line for line in lines if line and not line.startswith("#")]


class ApiKeys:
    def __init__(self, named_keys: list[tuple[str, str]]) -> None:
        self._digests = [(name, _digest(key)) for name, key in named_keys]

    @classmethod
    def from_settings(cls, settings: Settings) -> ApiKeys:
        """The configured keys; ValueError when they cannot be used: the file cannot be read or
        holds no key, or a key is shorter than MIN_KEY_LENGTH (a placeholder, a guessable key)."""
        entries = _entries(settings.api_keys.get_secret_value(), ",")
        if settings.api_keys_file is not None:
            try:
                in_file = _entries(settings.api_keys_file.read_text(encoding="utf-8"), "\n")
            except OSError as exc:
                raise ValueError(f"cannot read STREAMQ_API_KEYS_FILE: {exc}") from None
            if not in_file:
                raise ValueError(f"STREAMQ_API_KEYS_FILE ({settings.api_keys_file}) holds no key")
            entries += in_file
        named: list[tuple[str, str]] = []
        for number, entry in enumerate(entries, 1):
            name, separator, key = entry.partition(":")  # a name holds no ':'; an unnamed key neither
            if not separator:
                name, key = "", entry
            key = key.strip()
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(
                    f"API key {name.strip() or f'#{number}'} is {len(key)} characters long; use at "
                    f"least {MIN_KEY_LENGTH} random ones (e.g. `openssl rand -hex 24`)"
                )
            named.append((name.strip() or "key-" + _digest(key).hex()[:12], key))
        return cls(named)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, key: str) -> str | None:
        """The name of the key, or None. Every digest is compared, in constant time each."""
        presented = _digest(key)
        found = None
        for name, digest in self._digests:
            if hmac.compare_digest(presented, digest):
                found = name
        return found


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        message,
        type="authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def identify(keys: ApiKeys, authorization: str | None) -> Caller:
    """Who sends this ``Authorization`` header, or the 401 that says why not."""
    if not keys.enabled:
        return Caller(OPEN)
    token = bearer_token(authorization)
    if token is None:
        raise _unauthorized("an API key is required: send it as 'Authorization: Bearer KEY'")
    name = keys.identify(token)
    if name is None:
        raise _unauthorized("the API key is not valid")
    return Caller(name)


def is_open(method: str, path: str) -> bool:
    if path in OPEN_PATHS:
        return True
    return method in ("GET", "HEAD") and (path == "/" or path.startswith(OPEN_GET_PREFIXES))


class RequireApiKey:
    """Answers 401 to a request for a protected path without a valid key; otherwise hands the
    caller on to the routes (``scope["state"]["caller"]``)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.enabled or is_open(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        sent = [value for name, value in scope["headers"] if name == b"authorization"]
        try:
            if len(sent) > 1:  # which one counts would be up to each proxy on the way
                raise _unauthorized("send one 'Authorization' header, not several")
            caller = identify(self.keys, sent[0].decode("latin-1") if sent else None)
        except ApiError as exc:
            await error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


async def require_caller(request: Request) -> Caller:
    """The route dependency: who is calling. RequireApiKey checked the key before routing and
    left the caller here; a route outside its protection still gets its own check."""
    caller = getattr(request.state, "caller", None)
    if isinstance(caller, Caller):
        return caller
    return identify(request.app.state.api_keys, request.headers.get("authorization"))


CallerDep = Annotated[Caller, Depends(require_caller)]


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_bind_refusal(settings: Settings, keys: ApiKeys, host: str) -> str | None:
    """Why the front must not start on ``host`` (None: it may). Without keys it serves anyone
    who reaches it: only on a loopback address, unless ``--insecure`` says so."""
    if keys.enabled or settings.insecure or is_loopback(host):
        return None
    return (
        f"no API keys are configured and {host} is not a loopback address: anyone who reaches it "
        "could run jobs. Set STREAMQ_API_KEYS (or STREAMQ_API_KEYS_FILE), or pass --insecure "
        "(STREAMQ_INSECURE=1) if something in front of it does the authentication."
    )
