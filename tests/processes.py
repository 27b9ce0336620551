"""Test-only process helpers. The fronts, workers and private Redis servers themselves are started
with the harness (harness/services.py, harness/redis_server.py), as bench/ does."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil
import redis

from harness.services import Service, start_front

ROOT = Path(__file__).resolve().parent.parent


def clean_env(**changes: str) -> dict[str, str]:
    """This process's environment without any STREAMQ_ setting, with ``changes``: a command run
    as a new user would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMQ_")}
    return {**env, "PYTHONUNBUFFERED": "1", **changes}


def restart_front_soon(
    env: Mapping[str, str], logdir: Path, name: str, url: str, started: list[Service]
) -> threading.Thread:
    """Start a front again where ``url`` points, in a thread (its clients retry meanwhile); the new
    front is appended to ``started``. Join the thread before using it."""
    port = urlparse(url).port

    def start() -> None:
        started.append(start_front(env, logdir, name, port=port)[0])

    thread = threading.Thread(target=start, name=f"restart {name}")
    thread.start()
    return thread


def jobs_asking(redis: Any, marker: str) -> list[str]:
    """The ids of the jobs in a stack's Redis (a RedisServer) whose request holds ``marker``."""
    from shared import keys

    r = redis.client(decode_responses=True)
    return [
        r.hget(key, "id")
        for key in r.scan_iter(match=keys.job("*"), count=1000)
        if marker in (r.hget(key, "request") or "")
    ]


def blocked_in(r: redis.Redis, pid: int, command: str) -> bool:
    """Whether a connection of process ``pid`` is blocked in ``command`` (``blmove``) on the
    server: CLIENT LIST's entries matched by their address to the process's local ports."""
    ports = {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.laddr}
    for entry in r.client_list():
        flags, cmd = str(entry.get("flags", "")), str(entry.get("cmd", ""))
        if cmd == command and "b" in flags and int(str(entry.get("addr", ":0")).rsplit(":", 1)[1]) in ports:
            return True
    return False
