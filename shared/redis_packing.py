"""Commands packed for Redis in one C call, on every connection streamq's pools open.

redis-py packs a command with hiredis, but first passes each argument through a Python encoder
call. For the commands streamq sends most, that per-argument work was most of their cost here:
a worker's output script (``delta``: 19 arguments) took 13 µs to pack against 1.7 µs in one
``hiredis.pack_command`` call, and the stream hub's ``XREAD`` naming 1,000 followed streams
1.2 ms. ``hiredis.pack_command`` encodes str (UTF-8), bytes, int and float exactly as redis-py
does; any other argument (bool, None, bytearray: redis-py's own checks and errors), or a
command name with whitespace in it (redis-py splits "CLIENT SETNAME"), goes to redis-py's packer.

Installed only where it packs alike: connections that encode UTF-8 strictly (redis-py's
default; a URL may ask for another encoding) whose redis-py packs with hiredis.
"""

from __future__ import annotations

import codecs
from typing import Any

import hiredis  # redis[hiredis]: redis-py's own packer and parser use it too


class OneCallPacker:
    """A connection's command packer: one ``hiredis.pack_command`` call per command."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback  # the connection's own packer, for what hiredis does not take

    def pack(self, *args: Any) -> list[bytes]:
        name = args[0]
        if not isinstance(name, (str, bytes)) or len(name.split()) != 1:
            return self.fallback.pack(*args)  # redis-py splits "CLIENT SETNAME" (any whitespace)
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # bool, None, bytearray...: redis-py's packer encodes or refuses them
            return self.fallback.pack(*args)


def packs_alike(connection: Any) -> bool:
    """hiredis would pack this connection's commands byte for byte as redis-py does."""
    encoder = getattr(connection, "encoder", None)
    if encoder is None or getattr(connection, "_command_packer", None) is None:
        return False
    if not callable(getattr(hiredis, "pack_command", None)):  # hiredis before 2.1 (redis 5.0 allows it)
        return False
    return codecs.lookup(encoder.encoding).name == "utf-8" and encoder.encoding_errors == "strict"


def pack_in_one_call(pool: Any) -> Any:
    """Give every connection ``pool`` opens from now on a ``OneCallPacker`` (where it packs
    alike); returns the pool. Sync and asyncio pools alike: both make connections in
    ``make_connection``."""
    make = pool.make_connection

    def make_connection() -> Any:
        connection = make()
        if packs_alike(connection):
            connection._command_packer = OneCallPacker(connection._command_packer)
        return connection

    pool.make_connection = make_connection
    return pool
