"""One dispatcher per worker process: takes jobs off the model's queue for all its slots.

The dispatcher's thread waits for a free slot and takes jobs (``worker.rq_runs``): on an idle
queue it blocks for the first to come and starts it alone, at once; while jobs keep coming, each
look takes as many as are queued and fit the free slots, in one round trip. It records their
start in RQ and reads their state in one pipeline, and hands each to a thread of a pool of
``slots`` threads, all started with the dispatcher, that runs it on the engine
(``JobHost.run_job``: streamq's start, the engine, the wait for its end) and files its end in
RQ. So the process never runs more jobs than it has slots, an idle process costs one blocked
read, and a job costs RQ's records and no RQ worker loop. In RQ the process is one worker
(``rq info`` lists it busy while it runs any job); each run is an execution of that worker.

``stop_taking`` ends the loop (within ``IDLE_WAIT`` when idle); the jobs it started run on. In
burst mode the loop ends once the queue is empty and no job runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import redis
from rq.worker import WorkerStatus

from shared import keys
from shared.settings import Settings
from worker.job_runner import JobFailed, Outcome
from worker.rq_runs import RqRuns, Run
from worker.rq_worker import JobHost, StreamqWorker

log = logging.getLogger("streamq.worker")

IDLE_WAIT = 2  # seconds the dispatcher blocks on an empty queue before looking at a stop request
RQ_BEAT_EVERY = 30.0  # seconds between the process's heartbeats in RQ (its record lives 420 s a beat)
RETRY_AFTER = 1.0  # seconds to wait after a Redis error before taking jobs again


class Dispatcher:
    def __init__(
        self,
        connection: redis.Redis,
        host: JobHost,
        slots: int,
        name: str,
        settings: Settings,
        burst: bool = False,
    ) -> None:
        self._redis = connection
        self._host = host
        self._slots = slots
        self.name = name
        self._settings = settings
        self._burst = burst
        self.rq_worker = StreamqWorker(
            None,
            connection=connection,
            settings=settings,
            runtime=host,
            name=name,
            maintenance_interval=settings.maintenance_interval,
        )
        self.runs = RqRuns(
            connection, self.rq_worker, result_ttl=settings.result_ttl, job_timeout=settings.job_timeout
        )
        self._backlog = False  # the last take found jobs: look again before waiting
        self._free = list(range(slots - 1, -1, -1))  # slot numbers, the lowest taken first
        self._running: dict[int, Run] = {}  # slot number -> the run it holds
        self.taking_ended = threading.Event()  # set once the loop takes no more jobs
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="streamq-job")
        self._state_lock = threading.Lock()
        self._written_state = ""
        self._reannounce = threading.Event()  # set when Redis came back empty

    def data_lost(self) -> None:
        """Redis came back empty: the loop enters RQ's lists again (``StreamqWorker.reannounce``)."""
        self._reannounce.set()

    def running(self) -> int:
        with self._changed:
            return len(self._running)

    def stop_taking(self) -> None:
        """Take no new job (the loop ends within IDLE_WAIT); the jobs taken run on."""
        self._stop.set()
        with self._changed:
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no job runs; False if some still do after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))
        return True

    def run(self) -> None:
        """Take jobs until stopped (or, in burst mode, until the queue is empty); returns when the
        jobs taken have ended (or the drain time is up), and the process has left RQ's list of
        workers. A Redis error is logged and the loop goes on once Redis answers again."""
        worker = self.rq_worker
        beat_due = maintenance_due = 0.0
        registered = False
        try:
            self._start_slot_threads()
            while not self._stop.is_set():
                try:
                    if not registered:
                        self._register()
                        registered = True
                        self._write_state()
                    if self._reannounce.is_set():
                        self._reannounce.clear()  # a second loss meanwhile sets it again
                        try:
                            with self._state_lock:  # the state it writes is the last written
                                worker.reannounce()
                        except BaseException:
                            self._reannounce.set()  # tried again at the next round
                            raise
                    now = time.monotonic()
                    if now >= beat_due:
                        worker.heartbeat()
                        with self._changed:
                            running = list(self._running.values())
                        self.runs.beat(running)
                        beat_due = now + RQ_BEAT_EVERY
                    self.runs.file_counts()  # the jobs ended lately, in the worker's counters
                    if now >= maintenance_due:
                        worker.clean_registries()
                        self._list_queues()
                        maintenance_due = now + self._settings.maintenance_interval
                    if not self._take_once():
                        break
                except redis.RedisError as exc:
                    log.warning("dispatcher: Redis error: %s", exc)
                    self._stop.wait(RETRY_AFTER)
                except Exception:  # a bug, or no thread to be had: log it, and go on taking jobs
                    log.exception("dispatcher: taking jobs failed")
                    self._stop.wait(RETRY_AFTER)
        finally:
            self.taking_ended.set()
            self.wait_idle(float("inf") if self._burst else self._settings.drain_seconds + 10)
            self._pool.shutdown(wait=False)
            try:
                self.runs.file_counts(force=True)
            except redis.RedisError as exc:
                log.warning("could not add the last jobs to worker %s's counters: %s", self.name, exc)
            try:
                worker.register_death()
            except redis.RedisError as exc:
                log.warning("could not remove worker %s from RQ's list: %s", self.name, exc)

    def _start_slot_threads(self) -> None:
        """Start every slot's thread now. The pool would start one at each job that finds no idle
        thread, so a burst's first jobs would wait for thread starts: 74 ms for 57 jobs measured
        on a loaded worker (2 cores stepping vLLM), against 3 ms with the threads up."""
        up = threading.Barrier(self._slots + 1)
        passed = False
        try:
            for _ in range(self._slots):  # each holds its thread until all are up: none is reused
                self._pool.submit(up.wait, 60)
            up.wait(timeout=60)
            passed = True
        except RuntimeError as exc:  # no thread to be had (or a broken barrier): the pool starts
            log.warning("dispatcher: could not start its %d slot threads up front: %s", self._slots, exc)
        finally:  # them as jobs come, as before
            if not passed:
                up.abort()  # the threads already waiting go back to the pool

    def _register(self) -> None:
        """Enter RQ's list of workers. A live record of the same name (a process restarted with
        the same host name and pid, as in a container, within RQ's TTL of the killed one) makes
        this one register under the name with a suffix (the old record expires with its TTL)."""
        worker = self.rq_worker
        try:
            worker.register_birth()
        except ValueError:
            worker.name = f"{self.name}.{uuid.uuid4().hex[:8]}"
            log.warning("RQ has a live worker named %s already: this one is %s in RQ", self.name, worker.name)
            worker.register_birth()

    def _list_queues(self) -> None:
        """Put the worker's queues in RQ's set of queues, where the janitor looks for jobs taken and
        never started, and `rq info` for queues. A submit adds a queue only when its push made
        the list, so a member lost from the set (removed by hand, say) is put back here, at the
        worker's start and every maintenance interval."""
        worker = self.rq_worker
        worker.connection.sadd(keys.RQ_QUEUES, *(queue.key for queue in worker.queues))

    def _write_state(self) -> None:
        """RQ's state of the process's worker: busy while it runs any job, else idle (written on
        a change only)."""
        with self._state_lock:
            state = WorkerStatus.BUSY if self.running() else WorkerStatus.IDLE
            if state != self._written_state:
                self.rq_worker.set_state(state)
                self._written_state = state

    def _take_once(self) -> bool:
        """Wait for a free slot, take what fits, start it; False when a burst run is over. A job
        that comes to an idle queue is taken alone and started at once; while jobs keep coming,
        each look takes as many as are queued and slots are free."""
        with self._changed:
            if not self._free and not self._stop.is_set():
                self._changed.wait(1.0)  # then back to the loop, whose heartbeats go on
            free = len(self._free)
        if self._stop.is_set() or not free:
            return True
        look = self._burst or self._backlog
        taken = self.runs.take(free, None if look else IDLE_WAIT)
        if taken and self._stop.is_set():  # asked to stop while it waited: another worker's
            self.runs.put_back(taken)
            return True
        self._backlog = bool(taken)
        if not taken:
            if self._burst:
                if self.running() == 0:
                    return False
                with self._changed:
                    self._changed.wait(0.05)
            return True
        runs = self.runs.begin(taken)
        for run in runs:
            with self._changed:
                slot = self._free.pop()
                self._running[slot] = run
            try:
                self._pool.submit(self._run, run, slot)
            except RuntimeError:  # no thread to be had: the id stays in the intermediate list,
                self._release(slot)  # where the janitor finds it and queues it again
                raise
        self._write_state()
        return True

    def _release(self, slot: int) -> None:
        with self._changed:
            self._running.pop(slot, None)
            self._free.append(slot)
            self._changed.notify_all()

    def _run(self, run: Run, slot: int) -> None:
        outcome: Outcome | None = None
        error: BaseException | None = None
        try:
            outcome = self._host.run_job(run.job_id, f"{self.name}.{slot}", run.fields)
        except Exception as exc:  # JobFailed (recorded in streamq already), or a bug
            error = exc
            if not isinstance(exc, JobFailed):
                log.exception("job %s: the run raised", run.job_id)
        finally:
            try:
                self.runs.end(run, outcome, error)
            except Exception:
                log.exception("job %s: could not file its end in RQ", run.job_id)
            self._release(slot)
            with contextlib.suppress(redis.RedisError):  # written again at the next change
                self._write_state()
