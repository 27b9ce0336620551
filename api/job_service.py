"""Creating, reading and canceling jobs: the front's side of a job's life in Redis and RQ."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets
import time
from typing import Any

import anyio.to_thread
import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq.job import Job
from rq.queue import Queue

from api import idempotency
from api.admission import Admission, DrainRates
from api.auth import OPEN, Caller
from api.errors import ApiError
from api.idempotency import Idempotent
from api.idempotent_jobs import IdempotentJobs
from api.metrics import FrontMetrics
from api.prompt_counts import PromptCounts
from api.queue_positions import QueuePositions
from api.quotas import KeyQuotas
from api.request_limits import check_token_ids, generation_request
from api.worker_directory import WorkerDirectory
from shared import keys
from shared.job_store import scripts
from shared.job_store.payloads import Queued
from shared.job_store.records import new_job_fields, view_from_hash
from shared.job_store.rq_ended_records import file_canceled
from shared.job_store.rq_records import TASK, QueuedRecords
from shared.job_store.scripts import Answer, JobScripts, ScriptCall, ScriptsReloaded
from shared.job_store.vocabulary import FINAL_STATUSES, JobField, JobStatus
from shared.limits import may_not_fit
from shared.log_format import job_fields
from shared.schemas import GenerationRequest, JobRequest, JobView
from shared.settings import Settings

log = logging.getLogger("streamq.api")

# After a submit no replica acknowledged in time, the next ones are refused at once for this long
# (no write, no wait): while the replica is down, a WAIT per submit would hold the front's pool.
UNREPLICATED_PAUSE = 1.0
_JOB_ID = re.compile(r"[0-9a-f]{32}")


def new_job_id() -> str:
    """128 random bits, hex: unguessable."""
    return secrets.token_hex(16)


class JobService:
    def __init__(
        self,
        settings: Settings,
        connection: aioredis.Redis,
        rq_connection: redis.Redis,
        count_connection: aioredis.Redis,
        directory: WorkerDirectory,
        quotas: KeyQuotas,
        metrics: FrontMetrics | None = None,
    ) -> None:
        self._settings = settings
        self.quotas = quotas
        self.metrics = metrics or FrontMetrics()
        self._redis = connection
        self._rq = rq_connection
        self.prompt_counts = PromptCounts(settings, count_connection)
        self.directory = directory
        self._scripts = JobScripts(connection)
        self._idempotent = IdempotentJobs(connection, self._scripts)
        self._unreplicated_until = 0.0  # monotonic: refuse submits at once until then
        self._rq_records: dict[str, QueuedRecords] = {}  # per model: RQ's records, built with no I/O
        self.positions = QueuePositions(connection, max_age=settings.position_poll_interval)
        self.drain_rates = DrainRates(connection, settings.drain_window)
        self.admission = Admission(settings, self.drain_rates)

    # ----- creating -------------------------------------------------------------------------
    async def submit(
        self, request: JobRequest, caller: Caller, idempotent: Idempotent | None = None
    ) -> JobView:
        """Check the caller's rate, validate, pick the model, then create the job (owned by the
        caller) in one script that also checks the model's queue limit and the caller's
        concurrency, and writes RQ's job and queue entry. With an Idempotency-Key, the job it made
        already, if any, as it is now (``replayed``), before any quota or check."""
        job_id = new_job_id()
        if idempotent is not None:
            job_id, made = await self._idempotent.find(idempotent, caller.name)
            if made:
                return (await self._settled(job_id, caller.name)).as_replayed()
        await self.quotas.hit(caller.name)
        generation = generation_request(request, self._settings)
        model = await self.directory.resolve(request.model)
        needed = generation.engine_features()
        if needed and (refusal := await self.directory.missing_feature(model, needed)):
            raise refusal
        if generation.logit_bias or generation.token_ids:
            check_token_ids(generation, await self.directory.vocab_size(model))
        context_length = await self.directory.context_length(model)
        if may_not_fit(generation, context_length):
            await self.prompt_counts.check(model, generation, context_length)
        fingerprint = idempotent.fingerprint if idempotent is not None else ""
        created_at = time.time()
        position = await self._create(job_id, model, generation, created_at, caller.name, fingerprint)
        if position is None:  # sent again: the job exists
            view = await self.get(job_id, caller.name)
            return view.as_replayed() if idempotent is not None else view
        log.info(
            "job %s: queued for %s%s",
            job_id,
            model,
            f" by {caller.name}" if caller.name else "",
            extra=job_fields("queued", job_id, model),
        )
        if self._settings.log_prompts:
            log.info("job %s: prompt %s", job_id, generation.prompt_input().model_dump(exclude_none=True))
        self.metrics.jobs_submitted.labels(model).inc()
        try:
            wait = await self.estimated_wait(model, position)
        except RedisError:  # the job exists and will run; its wait is only a nicety here
            wait = None
        return JobView(
            id=job_id,
            model=model,
            status=JobStatus.QUEUED,
            position=position,
            estimated_wait_seconds=wait,
            created_at=created_at,
        )

    async def _create(
        self,
        job_id: str,
        model: str,
        generation: GenerationRequest,
        created_at: float,
        owner: str,
        fingerprint: str,
    ) -> int | None:
        """Create the job in one round trip; returns its place in the queue, or None when it
        exists already (the request sent again: 400 if what it asks is not what made the job).
        429 when the model's queue is full or the caller's key has its most jobs queued or
        running."""
        s = self._settings
        records = self._rq_records.get(model)
        if records is None:
            queue = Queue(keys.queue_name(model), connection=self._rq)
            records = QueuedRecords(queue, TASK, timeout=s.job_timeout, result_ttl=s.result_ttl)
            self._rq_records[model] = records
        fields = new_job_fields(job_id, model=model, owner=owner, created_at=created_at, request=generation)
        if fingerprint:
            fields[JobField.FINGERPRINT] = fingerprint
        call = scripts.submit(
            job_id,
            fields=fields,
            rq_job=records.queued(job_id, f"streamq job {job_id} for {model}"),
            queue_list=keys.rq_queue(model),
            max_queued=s.max_queued,
            life=s.records_life(),
            maxlen=s.stream_maxlen,
            queued_event=Queued(model=model),
            quota=self.quotas.quota(owner),
            now=created_at,
        )
        for pruned in (False, True):
            outcome, value = await self._run_replicated(call, job_id, model)
            if outcome == JobStatus.QUEUED:
                return int(value)
            if outcome == Answer.EXISTS:
                if value != fingerprint:
                    raise idempotency.reused()
                return None
            if outcome == Answer.QUEUE_FULL:
                raise await self.admission.queue_full(model, int(value))
            if pruned or not await self.quotas.prune(owner):
                break
        raise self.quotas.over_concurrency()

    async def _run_replicated(self, call: ScriptCall, job_id: str, model: str) -> Any:
        """Run the submit script; with replicas to wait for (Sentinel), WAIT for them on the same
        connection, in the same round trip. A job the replicas did not get in time is canceled
        and refused with a 503 (a 202 promises a job that survives a failover)."""
        s = self._settings
        replicas = s.replicas_to_wait_for()
        if not replicas:
            return await self._scripts.run(call)
        if time.monotonic() < self._unreplicated_until:  # the last one failed just now: no write
            raise self._unreplicated()
        for last in (False, True):
            pipe = self._redis.pipeline(transaction=False)
            self._scripts.run(call, client=pipe)
            pipe.wait(replicas, s.redis_wait_ms)
            try:
                answer, acked = await self._scripts.execute_async(pipe)
            except ScriptsReloaded:
                if last:
                    raise
                continue
            except RedisTimeoutError:  # the job may be written: it must not run behind a 503
                await self._withdraw(job_id, model)
                raise
            if answer[0] == Answer.EXISTS and int(acked) < replicas:  # its own request withdraws it
                raise self._unreplicated()
            if answer[0] != JobStatus.QUEUED or int(acked) >= replicas:
                self._unreplicated_until = 0.0
                return answer
            self._unreplicated_until = time.monotonic() + UNREPLICATED_PAUSE
            await self._withdraw(job_id, model)
            log.error(
                "job %s: %d of %d Redis replicas had it after %d ms; canceled and refused",
                job_id,
                int(acked),
                replicas,
                s.redis_wait_ms,
            )
            raise self._unreplicated()
        raise AssertionError("unreachable")

    async def _settled(self, job_id: str, owner: str) -> JobView:
        """A job made already, once its own request can no longer withdraw it: with replicas to
        wait for (Sentinel), that request waits up to STREAMQ_REDIS_WAIT_MS for them, and
        withdraws the job if they do not have it; a younger job is looked at again after that."""
        view = await self.get(job_id, owner)
        s = self._settings
        if s.replicas_to_wait_for():
            young = view.created_at + s.redis_wait_ms / 1000 + 0.1 - time.time()
            if young > 0:
                await asyncio.sleep(young)
            if await self._redis.hget(keys.job(job_id), JobField.WITHDRAWN):
                raise self._unreplicated()
            view = await self.get(job_id, owner)
        return view

    def _unreplicated(self) -> ApiError:
        self.metrics.jobs_unreplicated.inc()
        return ApiError(
            503,
            "the job store (Redis) could not copy the job to a replica in time, so it was not "
            "accepted; try again shortly",
            code="replica_unavailable",
            headers={"Retry-After": "1"},
        )

    async def _withdraw(self, job_id: str, model: str) -> None:
        """Cancel a job that no replica had in time, whether or not a worker took it meanwhile:
        its primary may be one the sentinels have already replaced (a failover they were told
        to make leaves it up and writable for seconds), where the job and its run would vanish
        after a 202, and a worker on it takes the job at once."""
        s = self._settings
        # Marked withdrawn in the same step (a job gone already, "missing", is not made again),
        # so that its Idempotency-Key, sent again, makes it anew once it has ended.
        cancel = scripts.cancel(job_id, model, ttl=s.result_ttl, maxlen=s.stream_maxlen, withdrawn=True)
        try:
            answer = scripts.answer(await self._scripts.run(cancel))
            if answer == Answer.OK:
                await anyio.to_thread.run_sync(self._file_rq_cancel, job_id)
            elif answer == Answer.RUNNING:  # started just now: it stops at its next step
                await self._redis.publish(keys.CANCEL_CHANNEL, job_id)
        except RedisError as exc:
            log.error("job %s: refused, but its cancel failed (it may run): %s", job_id, exc)

    # ----- reading --------------------------------------------------------------------------
    async def position(self, job_id: str, model: str) -> int | None:
        """The job's exact place in its queue (None once it left it)."""
        return await self.positions.exact(model, job_id)

    async def queued_position(self, job_id: str, model: str) -> int:
        """The place of a job whose status is queued: off the list but not yet started means a
        worker is taking it right now, so it is next (0)."""
        return await self.position(job_id, model) or 0

    async def estimated_wait(self, model: str, position: int | None) -> float | None:
        """Seconds until a queued job at ``position`` starts: 0 while its model's workers have a
        slot free for it, else at the model's drain rate (or None)."""
        if position is None:
            return None
        free = await self.directory.free_slots(model)
        return await self.drain_rates.estimated_wait(model, position, free)

    async def find(self, job_id: str, owner: str, brief: bool = False) -> JobView | None:
        """The job, if it exists and belongs to ``owner`` (another key's job is not found);
        ``brief``: without its text and queue position (one command)."""
        if not _JOB_ID.fullmatch(job_id):
            return None
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(keys.job(job_id))
        if not brief:
            pipe.get(keys.text(job_id))
        fields, *rest = await pipe.execute()
        text = rest[0] if rest else ""
        if not fields or JobField.STATUS not in fields:
            return None
        if not hmac.compare_digest(fields.get(JobField.OWNER, OPEN).encode(), owner.encode()):
            return None
        position = None
        if fields[JobField.STATUS] == JobStatus.QUEUED and not brief:
            position = await self.queued_position(job_id, fields[JobField.MODEL])
        view = view_from_hash(job_id, fields, text or "", position)
        if position is not None:
            view.estimated_wait_seconds = await self.estimated_wait(view.model, position)
        return view

    async def exists(self, job_id: str) -> bool:
        """The job's record is in Redis (it expires with its result, or vanishes with Redis's data)."""
        return bool(await self._redis.exists(keys.job(job_id)))

    async def resume_point(self, job_id: str, event_id: tuple[int, int]) -> tuple[str | None, bool]:
        """The job's newest event id, and whether ``event_id`` is one of its events (one round trip)."""
        exact = "-".join(map(str, event_id))
        pipe = self._redis.pipeline(transaction=False)
        pipe.xrevrange(keys.events(job_id), count=1)
        pipe.xrange(keys.events(job_id), min=exact, max=exact, count=1)
        newest, found = await pipe.execute()
        return (str(newest[0][0]) if newest else None), bool(found)

    async def get(self, job_id: str, owner: str, brief: bool = False) -> JobView:
        view = await self.find(job_id, owner, brief)
        if view is None:
            raise ApiError(404, f"no job with id '{job_id}'", param="id", code="job_not_found")
        return view

    # ----- canceling ------------------------------------------------------------------------
    async def cancel(self, job_id: str, owner: str) -> JobView:
        """Cancel ``owner``'s job. A queued one is taken off its queue before any worker sees it;
        a running one stops at its next step. Returns the job's view; 409 if it had ended."""
        asked = time.monotonic()
        view = await self.get(job_id, owner)
        s = self._settings
        call = scripts.cancel(job_id, view.model, ttl=s.result_ttl, maxlen=s.stream_maxlen)
        answer = scripts.answer(await self._scripts.run(call))
        if answer == Answer.MISSING:
            raise ApiError(404, f"no job with id '{job_id}'", param="id", code="job_not_found")
        if answer in FINAL_STATUSES:
            raise self._already_ended(await self.get(job_id, owner))
        if answer == Answer.OK:  # no run held it (still queued, or taken by a worker that never started it)
            log.info(
                "job %s: canceled while queued", job_id, extra=job_fields("canceled", job_id, view.model)
            )
            self.metrics.cancel_latency.labels("queued").observe(time.monotonic() - asked)
            await anyio.to_thread.run_sync(self._file_rq_cancel, job_id)
        else:  # running: its worker stops at the next token
            await self._redis.publish(keys.CANCEL_CHANNEL, job_id)
            log.info("job %s: cancel requested while running", job_id)
            await self._wait_final(job_id)
            canceled = await self.get(job_id, owner)
            if canceled.status == JobStatus.CANCELED:
                self.metrics.cancel_latency.labels("running").observe(time.monotonic() - asked)
            elif canceled.status in FINAL_STATUSES:  # it ended before its worker saw the cancel
                raise self._already_ended(canceled)
            return canceled
        return await self.get(job_id, owner)

    @staticmethod
    def _already_ended(ended: JobView) -> ApiError:
        return ApiError(
            409,
            f"job '{ended.id}' has already ended ({ended.status})",
            code="job_already_ended",
            body={"job": ended.model_dump(mode="json")},
        )

    def _file_rq_cancel(self, job_id: str) -> None:
        """Keep RQ's registries true: the RQ job is canceled too (it never ran)."""
        try:
            file_canceled(self._rq, Job.fetch(job_id, connection=self._rq), self._settings.result_ttl)
        except Exception as exc:  # bookkeeping only: the job is already canceled for streamq
            log.warning("job %s: RQ bookkeeping of the cancel failed: %s", job_id, exc)

    async def _wait_final(self, job_id: str) -> None:
        """Wait up to ``cancel_wait`` for the job to end; then, where its run's lease is no longer
        renewed (its worker died), until it lapses and the janitor has ended the job: a worker
        that died just before the cancel holds its job until then (as long as the wait, by
        default), and its cancel answered "running" a tenth of a second before the job ended."""
        s = self._settings
        deadline = time.monotonic() + s.cancel_wait
        extended = False
        while True:
            if await self._redis.hget(keys.job(job_id), JobField.STATUS) in FINAL_STATUSES:
                return
            if time.monotonic() >= deadline:
                if extended:
                    return
                extended = True
                left = await self._redis.pttl(keys.lease(job_id))  # ms; -2: lapsed already
                if left > 1000 * (s.lease_seconds - 2 * s.lease_renew_seconds):  # renewed: a live
                    return  # worker's (it ends when the engine drops it, after this answer)
                deadline = time.monotonic() + max(left, 0) / 1000 + 2 * s.janitor_interval + 0.5
            await asyncio.sleep(0.02)
