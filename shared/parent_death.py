"""A child process that ends with its parent, however the parent ends (even by SIGKILL)."""

from __future__ import annotations

import signal
import sys


def die_with_parent() -> None:
    """In a child (before exec, or first thing after start): get SIGTERM when its parent dies.
    Linux only; elsewhere nothing happens."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)
