"""A Sentinel-managed Redis on loopback: a primary, a replica and three sentinels, each its own
``redis-server`` in one temporary folder. The failover tests and the chaos benchmark run it, kill
its primary and watch the sentinels promote the replica."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from shared.parent_death import die_with_parent
from streamq.processes import free_port
from streamq.redis_server import REDIS_HINT, find_redis_server, start_private_redis

MASTER = "streamq"


def _quorate(view: dict[str, Any]) -> bool:
    """A sentinel's view of the master: it sees the replica and the two other sentinels."""
    return int(view["num-other-sentinels"]) == 2 and int(view["num-slaves"]) >= 1


class SentinelRedis:
    """Two Redis servers (one primary, one replica) and three sentinels with a quorum of two."""

    def __init__(
        self, master: str = MASTER, down_after_ms: int = 1000, failover_timeout_ms: int = 4000
    ) -> None:
        exe = find_redis_server()
        if exe is None:
            raise FileNotFoundError(REDIS_HINT)
        self._exe = exe
        self.master = master
        self.dir = Path(tempfile.mkdtemp(prefix="streamq-sentinel-"))
        self.data_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        try:
            self.start_node(self.data_ports[0])
            self.start_node(self.data_ports[1], replica_of=self.data_ports[0])
            for port in self.sentinel_ports:
                self._start_sentinel(port, down_after_ms, failover_timeout_ms)
            self.wait_ready()
        except BaseException:
            self.close()
            raise

    # ----- what clients are given ---------------------------------------------------------------
    @property
    def sentinels(self) -> str:
        """The ``STREAMQ_REDIS_SENTINELS`` value."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def env(self) -> dict[str, str]:
        return {
            "STREAMQ_REDIS_SENTINELS": self.sentinels,
            "STREAMQ_REDIS_SENTINEL_MASTER": self.master,
            "STREAMQ_REDIS_URL": "redis://sentinel-managed/0",
        }

    def client(self, port: int | None = None) -> redis.Redis:
        """A client of ``port`` (default: the primary now)."""
        return redis.Redis(port=port or self.primary_port(), socket_timeout=2, decode_responses=True)

    # ----- the nodes ----------------------------------------------------------------------------
    def start_node(self, port: int, replica_of: int | None = None, promotable: bool = True) -> None:
        """(Re)start a data node, empty; as a replica of ``replica_of`` when given."""
        extra = ["--replicaof", "127.0.0.1", str(replica_of)] if replica_of else []
        extra += [] if promotable else ["--replica-priority", "0"]
        workdir = self.dir / f"node-{port}"
        workdir.mkdir(exist_ok=True)
        self._procs[port], _ = start_private_redis(workdir, port, extra)

    def rejoin(self, port: int, primary: int, timeout: float = 30) -> None:
        """Start a node that died (its data gone: these nodes keep nothing on disk) as a replica
        of ``primary``, unpromotable (replica-priority 0) until it has synced: else a failover
        in between (a primary slow to answer on a busy machine) would promote an empty node and
        the others would copy its emptiness. Returns once it is in sync and promotable."""
        self.start_node(port, replica_of=primary, promotable=False)
        node = self.client(port)
        deadline = time.monotonic() + timeout
        while node.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node on {port} did not sync with the primary in time")
            time.sleep(0.05)
        node.config_set("replica-priority", 100)

    def kill(self, port: int) -> None:
        proc = self._procs.pop(port, None)
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)

    def lose_last_writes(self, seconds: float, timeout: float = 30) -> tuple[int, int]:
        """A failover that loses writes, as a real network can: the replica is cut off from the
        primary (frozen, its link closed) for ``seconds`` while the primary takes writes, then the
        primary dies and the replica, thawed, is promoted without them. The old primary comes back
        as a replica of the new one. Returns (old port, new port)."""
        old, replica = self.primary_port(), self.replica_port()
        frozen = self._procs[replica]
        frozen.send_signal(signal.SIGSTOP)
        try:
            self.client(old).client_kill_filter(_type="replica")
            time.sleep(seconds)
            self.kill(old)
        finally:
            frozen.send_signal(signal.SIGCONT)
        new = self.wait_promoted(old, timeout)
        self.rejoin(old, new)
        return old, new

    def _start_sentinel(self, port: int, down_after_ms: int, failover_timeout_ms: int) -> None:
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {self.master} 127.0.0.1 {self.data_ports[0]} 2\n"
            f"sentinel down-after-milliseconds {self.master} {down_after_ms}\n"
            f"sentinel failover-timeout {self.master} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.master} 1\n"
        )
        self._procs[port] = subprocess.Popen(
            [self._exe, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=1, decode_responses=True)

    def primary_port(self) -> int:
        """The primary's port, as the first sentinel that answers says."""
        for port in self.sentinel_ports:
            try:
                addr: Any = self._sentinel(port).sentinel_get_master_addr_by_name(self.master)
            except redis.RedisError:
                continue
            if addr:
                return int(addr[1])
        raise RuntimeError("no sentinel answers")

    def wait_ready(self, timeout: float = 30) -> None:
        """Until every sentinel sees the replica and the two other sentinels (so a failover can
        reach its quorum), and the replica is in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                views: list[Any] = [
                    self._sentinel(p).sentinel_master(self.master) for p in self.sentinel_ports
                ]
                synced = self.client(self.replica_port()).info("replication").get("master_link_status")
            except (redis.RedisError, RuntimeError):
                views, synced = [], None
            if views and synced == "up" and all(_quorate(v) for v in views):
                return
            time.sleep(0.1)
        raise RuntimeError("the sentinels did not see the replica and each other in time")

    def replica_port(self) -> int:
        primary = self.primary_port()
        return next(p for p in self.data_ports if p != primary)

    def fail_over(self, timeout: float = 30) -> tuple[int, int, float]:
        """SIGKILL the primary and wait until the sentinels promote the replica; then start the old
        one again, empty, as a replica of the new. Returns (old port, new port, seconds to promote)."""
        old = self.primary_port()
        began = time.monotonic()
        self.kill(old)
        new = self.wait_promoted(old, timeout)
        took = time.monotonic() - began
        self.rejoin(old, new)
        return old, new, took

    def commanded_failover(self, timeout: float = 30) -> tuple[int, int, float]:
        """``SENTINEL FAILOVER``, as an operator moves the primary (an upgrade, a host drained):
        the old primary stays up, and writable, until the sentinels reconfigure it as a replica of
        the new one, seconds after the promotion. Returns (old port, new port, seconds to promote),
        once the old one is a replica in sync."""
        old = self.primary_port()
        deadline = time.monotonic() + timeout
        # Until the sentinel sees a replica it may promote: a node that rejoined is made promotable
        # once it has synced, and a sentinel reads that in its next INFO of it (every 10 s); it
        # answers NOGOODSLAVE meanwhile.
        while True:
            began = time.monotonic()
            try:
                self._sentinel(self.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", self.master)
                break
            except redis.ResponseError as exc:
                if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        new = self.wait_promoted(old, timeout)
        took = time.monotonic() - began
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                link = self.client(old).info("replication").get("master_link_status")
            except redis.RedisError:
                link = None
            if link == "up":
                break
            time.sleep(0.1)
        self.wait_ready(timeout)
        return old, new, took

    def wait_promoted(self, old: int, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                new = self.primary_port()
                if new != old and self.client(new).info("replication")["role"] == "master":
                    return new
            except (redis.RedisError, RuntimeError):
                pass
            time.sleep(0.05)
        raise RuntimeError("the sentinels promoted no replica in time")

    def close(self) -> None:
        for port in list(self._procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> SentinelRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
