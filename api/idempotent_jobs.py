"""Finding the job an Idempotency-Key made (``api.idempotency``), before a request goes through
the quotas and checks of a new job: its id from the key and the secret in Redis, and what the
job's hash says of it (its fingerprint, whether a front withdrew it).

One round trip as a rule: the secret is kept, and read again beside the job's hash, so a Redis
that restarted empty (a new secret, made by whichever front needs one first) is noticed at once.
"""

from __future__ import annotations

import secrets

import redis.asyncio as aioredis
from rq.registry import CanceledJobRegistry

from api.errors import ApiError
from api.idempotency import Idempotent, reused
from shared import keys
from shared.job_store import scripts
from shared.job_store.scripts import JobScripts, ScriptCall
from shared.job_store.vocabulary import JobField

WITHDRAWING_RETRY_SECONDS = 1


class IdempotentJobs:
    def __init__(self, connection: aioredis.Redis, job_scripts: JobScripts) -> None:
        self._redis = connection
        self._scripts = job_scripts
        self._secret: bytes | None = None

    async def _made_secret(self) -> bytes:
        """The secret in Redis, made there if it has none (the first front to need one wins)."""
        await self._redis.set(keys.IDEMPOTENCY_SECRET, secrets.token_hex(32), nx=True)
        stored = await self._redis.get(keys.IDEMPOTENCY_SECRET)
        return str(stored).encode()

    async def find(self, idempotent: Idempotent, owner: str) -> tuple[str, bool]:
        """The id of the job the key makes for ``owner``, and whether it exists already (True:
        answer it, sent again; False: create it under that id). A 400 when it exists for another
        request; a withdrawn job, ended, is forgotten first (a 503 while it is still stopping)."""
        for _ in range(2):
            secret = self._secret or await self._made_secret()
            job_id = idempotent.job_id(secret, owner)
            pipe = self._redis.pipeline(transaction=False)
            pipe.get(keys.IDEMPOTENCY_SECRET)
            pipe.hmget(
                keys.job(job_id), [JobField.STATUS, JobField.FINGERPRINT, JobField.WITHDRAWN, JobField.MODEL]
            )
            stored, (status, fingerprint, withdrawn, model) = await pipe.execute()
            if stored is None or str(stored).encode() != secret:  # a new Redis, or the first time
                self._secret = None if stored is None else str(stored).encode()
                continue
            self._secret = secret
            if status is None:
                return job_id, False
            if withdrawn and await self._forgot(job_id, str(model)):
                return job_id, False
            if fingerprint != idempotent.fingerprint:
                raise reused()
            return job_id, True
        raise ApiError(503, "the job store's idempotency secret changed twice: send the request again")

    async def _forgot(self, job_id: str, model: str) -> bool:
        answer = int(await self._scripts.run(forget(job_id, model)))
        if answer < 0:
            raise ApiError(
                503,
                "this Idempotency-Key's first request was refused and its job is still stopping: "
                "send it again in a moment",
                type="service_unavailable",
                headers={"Retry-After": str(WITHDRAWING_RETRY_SECONDS)},
            )
        return answer == 1


def forget(job_id: str, model: str) -> ScriptCall:
    """Forget a withdrawn job once it has ended (lua_sources.FORGET)."""
    canceled = CanceledJobRegistry.key_template.format(keys.queue_name(model))
    job_keys = [
        keys.job(job_id),
        keys.events(job_id),
        keys.text(job_id),
        keys.tokens(job_id),
        keys.rq_job(job_id),
        keys.response(job_id),
        canceled,
    ]
    return ScriptCall(scripts.FORGET, job_keys, [job_id])
