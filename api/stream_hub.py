"""One multiplexed reader per front process for every job stream its clients wait on.

Each waiting client holds a Subscription (a stream key, the last entry id it has, and an
asyncio queue). A single task keeps one blocking ``XREAD`` over all those keys on one
dedicated Redis connection and hands each entry to the subscriptions that have not seen it.
A new subscription wakes the reader through a small per-front wake-up stream, so it joins
the read at once instead of after the block timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.digits import ascii_digits

log = logging.getLogger("streamq.api")

Entry = tuple[str, dict[str, str]]
# Put in every subscription's queue when Redis lost its data: its follower checks that its job
# still exists (``JobFollower``), so a client of a vanished job gets an error at once.
CHECK_JOB: Entry = ("", {})
WAKE_KEY_LIFE = 3600  # seconds the wake-up stream lives after its TTL was last set
# Between two reads, the hub waits GATHER_PER_STREAM seconds per stream it follows (at most
# GATHER_MAX; not at all under GATHER_MIN): 1,000 streams, 10 ms; fewer than 100, none.
GATHER_PER_STREAM = 10e-6
GATHER_MIN = 0.001
GATHER_MAX = 0.010
_MAX_PART = 2**64 - 1


def parse_entry_id(entry_id: str) -> tuple[int, int]:
    """A stream entry id ("<ms>-<seq>" or "<ms>") as a pair; ValueError if Redis would refuse it."""
    ms, dash, seq = entry_id.partition("-")
    if not ascii_digits(ms) or (dash and not ascii_digits(seq)):
        raise ValueError(f"not a stream entry id: {entry_id!r}")
    pair = int(ms), int(seq or 0)
    if max(pair) > _MAX_PART:
        raise ValueError(f"stream entry id out of range: {entry_id!r}")
    return pair


class Subscription:
    def __init__(self, key: str, last_id: str) -> None:
        self.key = key
        self.last_id = last_id
        # Entries in order; None once the hub can no longer serve this subscription.
        self.queue: asyncio.Queue[Entry | None] = asyncio.Queue()
        self.interrupted: str | None = None


class StreamHub:
    def __init__(
        self,
        reader: aioredis.Redis,
        writer: aioredis.Redis,
        front_id: str,
        block_ms: int = 10_000,
        count: int = 500,
        reconnect_every: float | None = None,
    ) -> None:
        self._reader = reader  # its own connection: it blocks in XREAD
        # Reopen the reader's connection this often (None: never). A reader on a replica falls
        # back to the primary while no replica is in sync (after a failover), and comes back to
        # a replica when it reconnects.
        self._reconnect_every = reconnect_every
        self._connected_at = time.monotonic()
        self._writer = writer  # the shared pool: wake-ups
        self._wake_key = keys.hub_wakeup(front_id)
        self._block_ms = block_ms
        self._count = count
        self._subs: dict[str, set[Subscription]] = {}
        self._cursors: dict[str, str] = {}
        self._blocking = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake_cursor = "0-0"
        self._wake_task: asyncio.Task[None] | None = None  # the wake-up of the XREAD in flight
        self._wake_key_kept = -float(WAKE_KEY_LIFE)  # monotonic time the wake-up key's TTL was last set
        self._closed: str | None = None  # why every stream ends at once (the front is stopping)

    @property
    def closed(self) -> str | None:
        """Why every stream was ended (``close_streams``), or None while the hub serves."""
        return self._closed

    @property
    def stream_count(self) -> int:
        return len(self._subs)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="streamq-stream-hub")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            # redis-py may turn the cancel of a blocked read into a timeout error; the
            # _stopping flag ends the loop then.
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError):
                await asyncio.wait_for(self._task, timeout=5)
        with contextlib.suppress(RedisError):
            await self._writer.delete(self._wake_key)

    async def subscribe(self, key: str, last_id: str = "0-0") -> Subscription:
        """Entries of stream ``key`` after ``last_id`` (and all later ones) go to the subscription's queue."""
        parse_entry_id(last_id)
        sub = Subscription(key, last_id)
        if self._closed is not None:  # the front is stopping: this stream ends at once too
            sub.interrupted = self._closed
            sub.queue.put_nowait(None)
            return sub
        self._subs.setdefault(key, set()).add(sub)
        cursor = self._cursors.get(key)
        if cursor is None or parse_entry_id(last_id) < parse_entry_id(cursor):
            self._cursors[key] = last_id
        self._changed.set()
        # The XREAD in flight does not know this key yet: wake it. Subscriptions that come while
        # a wake-up is on its way share it; it belongs to the hub, so a subscriber that goes
        # away (its client disconnected) does not take it down with it.
        wake = self._wake()
        if wake is not None:
            try:
                await asyncio.shield(wake)
            except BaseException:
                self.unsubscribe(sub)
                raise
        return sub

    def _wake(self) -> asyncio.Task[None] | None:
        """The wake-up of the blocked read (started now, or the one already on its way); None when
        no read is blocked."""
        if not self._blocking:
            return None
        if self._wake_task is None or self._wake_task.done():
            self._wake_task = asyncio.create_task(self._send_wake(), name="streamq-hub-wake")
            # Its error reaches the subscribers awaiting it; when none is left, it is dropped here.
            self._wake_task.add_done_callback(lambda task: task.cancelled() or task.exception())
        return self._wake_task

    async def _send_wake(self) -> None:
        now = time.monotonic()
        renew = now - self._wake_key_kept > WAKE_KEY_LIFE / 2  # it expires once its front is gone
        pipe = self._writer.pipeline(transaction=False)
        pipe.xadd(self._wake_key, {"w": "1"}, maxlen=1)
        if renew:
            pipe.expire(self._wake_key, WAKE_KEY_LIFE)
        await pipe.execute()
        if renew:
            self._wake_key_kept = now

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.key)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.key]
            self._cursors.pop(sub.key, None)

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            if not self._subs:
                self._changed.clear()
                await self._changed.wait()
                continue
            await self._reconnect_when_due()
            asked = dict(self._cursors)
            streams: dict[str, str] = {**asked, self._wake_key: self._wake_cursor}
            self._blocking = True
            try:
                reply = cast(
                    list[tuple[str, list[Entry]]],
                    await self._reader.xread(streams, count=self._count, block=self._block_ms),  # type: ignore[arg-type]
                )
            except Exception as exc:  # Redis errors above all; anything else must not stop the reader
                if self._stopping:
                    return
                if not isinstance(exc, RedisError):
                    log.exception("stream reader failed")
                log.warning("stream reader failed (%s); retrying in %.1fs", exc, backoff)
                # Clients are told what failed, not where (the address and driver's words: the log).
                self._interrupt_all("the job store (Redis) could not be read")
                # Pause before the next read, unless a new subscription comes: it is tried at
                # once (and told at once if Redis is still away) rather than after the pause.
                self._changed.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            finally:
                self._blocking = False
                self._wake_task = None  # the next read is a new one: a new subscription wakes it anew
            backoff = 0.1
            for key, entries in reply or []:
                if key == self._wake_key:
                    self._wake_cursor = entries[-1][0]
                elif entries:
                    self._deliver(key, entries, asked.get(key))
            # A read names every stream followed here, so with many of them one read per delta
            # would cost the front and Redis work in proportion to the streams for each delta.
            # The next read waits a little, in proportion too, to gather what comes meanwhile.
            pause = min(GATHER_MAX, len(asked) * GATHER_PER_STREAM)
            if pause >= GATHER_MIN:
                await asyncio.sleep(pause)

    async def _reconnect_when_due(self) -> None:
        if self._reconnect_every is None or time.monotonic() - self._connected_at < self._reconnect_every:
            return
        self._connected_at = time.monotonic()
        await self._reader.connection_pool.disconnect()  # the next read connects anew

    def _deliver(self, key: str, entries: list[Entry], asked_from: str | None) -> None:
        if asked_from is None:
            return
        # Move the cursor on unless a new subscription moved it back meanwhile: its backlog is
        # then read again next time, and the others skip entries they already have.
        if self._cursors.get(key) == asked_from:
            self._cursors[key] = entries[-1][0]
        read_from = parse_entry_id(asked_from)
        for sub in tuple(self._subs.get(key, ())):
            last = parse_entry_id(sub.last_id)
            if last < read_from:
                continue  # it joined during this read and needs older entries first
            for entry_id, fields in entries:
                if parse_entry_id(entry_id) > last:
                    sub.queue.put_nowait((entry_id, fields))
                    sub.last_id = entry_id

    def check_jobs(self) -> None:
        """Ask every follower to check that its job still exists (Redis lost its data, and with it
        the wake-up key's TTL: it is set again at the next wake-up)."""
        self._wake_key_kept = -float(WAKE_KEY_LIFE)
        for subs in self._subs.values():
            for sub in subs:
                sub.queue.put_nowait(CHECK_JOB)

    def close_streams(self, reason: str) -> None:
        """End every subscription now, and any made from now on, with ``reason`` (the front is
        stopping: its clients resume or retry on another)."""
        self._closed = reason
        self._interrupt_all(reason)

    def _interrupt_all(self, reason: str) -> None:
        """End every subscription: its follower reports the interruption; clients resume later."""
        for subs in self._subs.values():
            for sub in subs:
                sub.interrupted = reason
                sub.queue.put_nowait(None)
        self._subs.clear()
        self._cursors.clear()
