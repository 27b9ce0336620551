"""Whether a TCP port is free to listen on, checked before a server starts (its own error comes
only after its startup, in its log)."""

from __future__ import annotations

import errno
import socket


def port_in_use(host: str, port: int) -> bool:
    """Something listens on (or holds) ``host:port``. Bound as uvicorn binds (SO_REUSEADDR), so a
    port whose last connections linger in TIME_WAIT (a stack just stopped) is free, as it is to
    uvicorn."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:  # another error (an address not of this host...) is the server's to say
            return exc.errno == errno.EADDRINUSE
    return False
