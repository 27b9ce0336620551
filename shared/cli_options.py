"""What the components' subcommands share: option choices and help, and settings with options applied.

Each component adds its own subcommands (api/cli.py, worker/cli.py, streamq/chat_cli.py,
streamq/launcher.py, streamq/status_report.py); streamq/cli.py only wires them together.
"""

from __future__ import annotations

from typing import get_args

from shared.settings import Device, Dtype, Engine, Settings

INSECURE_HELP = "serve without API keys on a non-loopback address (STREAMQ_INSECURE=1)"
ENGINES = list(get_args(Engine))
ENGINE_HELP = "the worker's engine (STREAMQ_ENGINE; auto: vLLM on a GPU when installed, else transformers)"
DEVICES = list(get_args(Device))
DTYPES = list(get_args(Dtype))


def with_options(settings: Settings, **changes: object) -> Settings:
    """The settings with the options given on the command line (None = not given), checked as
    the environment's are (an option bypasses no bound: ``--slots -3`` is refused as
    ``STREAMQ_SLOTS=-3`` is). Raises pydantic's ValidationError (``settings_refusal`` in
    shared/settings_loading.py says it in one line)."""
    given = {name: value for name, value in changes.items() if value is not None}
    if not given:
        return settings
    return Settings.model_validate({**settings.model_dump(), **given})
