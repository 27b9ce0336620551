"""The ``streamq`` command as a child process (``python -m streamq ...``, no console script
needed), and free ports: ``streamq up`` starts its fronts and workers with them, and the test
and benchmark harness (harness/services.py) does too."""

from __future__ import annotations

import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def streamq_command(*args: str) -> list[str]:
    """The ``streamq`` command run by this Python (no console script on PATH needed)."""
    return [sys.executable, "-m", "streamq", *args]
