"""API keys: ``Authorization: Bearer KEY`` on every route but health, readiness and metrics.

Keys come from ``STREAMQ_API_KEYS`` (comma-separated) and ``STREAMQ_API_KEYS_FILE`` (one per
line, ``#`` comments); each entry is ``KEY`` or ``name:KEY``. Only SHA-256 digests are kept in
memory, and a presented key is compared with every one of them in constant time. A key's name
(given, or ``key-`` + the start of its digest) is who it is: it owns the jobs it creates, its
quotas are counted under it, and logs show it instead of the key. Two keys may share a name
(rotation: the new key still reaches the old key's jobs).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from api.errors import ApiError
from shared.settings import Settings

OPEN = ""  # the caller's name when the server runs without keys


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
        """The configured keys; ValueError when the file cannot be read or an entry is empty."""
        entries = _entries(settings.api_keys.get_secret_value(), ",")
        if settings.api_keys_file is not None:
            try:
                entries += _entries(settings.api_keys_file.read_text(encoding="utf-8"), "\n")
            except OSError as exc:
                raise ValueError(f"cannot read STREAMQ_API_KEYS_FILE: {exc}") from None
        named: list[tuple[str, str]] = []
        for entry in entries:
            name, separator, key = entry.partition(":")  # a name holds no ':'; a key may
            if not separator:
                name, key = "", entry
            if not key.strip():
                raise ValueError("an API key entry is empty (entries are KEY or name:KEY)")
            key = key.strip()
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


def require_caller(request: Request) -> Caller:
    """The route dependency: who is calling, or 401."""
    keys: ApiKeys = request.app.state.api_keys
    if not keys.enabled:
        return Caller(OPEN)
    token = bearer_token(request.headers.get("authorization"))
    if token is None:
        raise _unauthorized("an API key is required: send it as 'Authorization: Bearer KEY'")
    name = keys.identify(token)
    if name is None:
        raise _unauthorized("the API key is not valid")
    return Caller(name)


CallerDep = Annotated[Caller, Depends(require_caller)]


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def open_bind_refusal(settings: Settings, host: str) -> str | None:
    """Why the front must not start on ``host`` (None: it may). Without keys it serves anyone
    who reaches it: only on a loopback address, unless ``--insecure`` says so."""
    try:
        keys = ApiKeys.from_settings(settings)
    except ValueError as exc:
        return str(exc)
    if keys.enabled or settings.insecure or is_loopback(host):
        return None
    return (
        f"no API keys are configured and {host} is not a loopback address: anyone who reaches it "
        "could run jobs. Set STREAMQ_API_KEYS (or STREAMQ_API_KEYS_FILE), or pass --insecure "
        "(STREAMQ_INSECURE=1) if something in front of it does the authentication."
    )
