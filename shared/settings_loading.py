"""Reading the settings once per process, and saying in one line why they are refused."""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Mapping

from pydantic import ValidationError

from shared.settings import Settings

# The command-line options that set a setting, named with it when it is refused.
OPTIONS = {
    "api_workers": "--workers",
    "synthetic_tokens_per_second": "--tokens-per-second",
    "insecure": "--insecure",
    "slots": "--slots",
    "model": "--model",
    "engine": "--engine",
    "device": "--device",
    "dtype": "--dtype",
    "backend": "--backend",
}


# STREAMQ_* variables that are not settings: the client's (streamq.protocol), the compose files'
# and the test suite's.
NOT_SETTINGS = frozenset(
    {
        "STREAMQ_URL",
        "STREAMQ_API_KEY",
        "STREAMQ_API_PORTS",
        "STREAMQ_REDIS_MAXMEMORY",
        "STREAMQ_REQUIRE_VLLM",
        "STREAMQ_WEB_SCREENSHOT",
    }
)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The STREAMQ_* variables in ``environ`` that name no setting."""
    names = {f"STREAMQ_{field.upper()}" for field in Settings.model_fields} | NOT_SETTINGS
    return sorted(v for v in environ if v.upper().startswith("STREAMQ_") and v.upper() not in names)


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """One line for each STREAMQ_* variable that names no setting (a misspelt one is otherwise
    ignored: STREAMQ_REDIS_SENTINAL would leave the process on the default Redis), with the
    setting it most likely meant."""
    names = sorted(f"STREAMQ_{field.upper()}" for field in Settings.model_fields)
    lines = []
    for variable in unknown_variables(environ):
        close = difflib.get_close_matches(variable.upper(), names, n=1)
        meant = f" (did you mean {close[0]}?)" if close else ""
        lines.append(f"{variable} is not a setting: it is ignored{meant}")
    return lines


def _may_hold_a_secret(field: str) -> bool:
    """A secret setting (its type hides it), or the Redis URL (its password)."""
    info = Settings.model_fields.get(field)
    return field == "redis_url" or (info is not None and "SecretStr" in str(info.annotation))


def settings_refusal(exc: ValidationError, options: dict[str, str] | None = None) -> str:
    """Bad settings as one line: each variable (and its option: ``OPTIONS``, and a command's own
    ``options``), what is wrong, what was given."""
    named = {**OPTIONS, **(options or {})}
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if not field:  # a check of several settings together: its message names them
            problems.append(message.removeprefix("Value error, "))
            continue
        name = f"STREAMQ_{field.upper()}"
        if field in named:
            name += f" ({named[field]})"
        # What was given, unless it may hold a secret (a key, a password in a URL).
        given = "" if _may_hold_a_secret(field) else f", got {error.get('input')!r}"
        problems.append(f"{name}: {message[0].lower()}{message[1:]}{given}")
    return "; ".join(problems)


def refuse_to_start(exc: ValidationError, options: dict[str, str] | None = None) -> int:
    """Say in one line why the settings (or a command's ``options``) are refused; the exit code, 2."""
    print(f"streamq: refusing to start: {settings_refusal(exc, options)}", file=sys.stderr)
    return 2


def load_settings() -> Settings:
    """Read the settings from the environment (call once per process, then pass the object down).
    Settings that are not valid stop the process (exit code 2) with one line that says why, not
    a traceback: whichever command or server reads them."""
    try:
        settings = Settings()
    except ValidationError as exc:
        raise SystemExit(refuse_to_start(exc)) from None
    for line in unknown_settings(os.environ):
        print(f"streamq: warning: {line}", file=sys.stderr)
    return settings
