"""A job's records outside the scripts: the hash the front creates, and the view read back from it."""

from __future__ import annotations

from collections.abc import Mapping

from shared.job_store.vocabulary import JobField, JobStatus
from shared.schemas import GenerationRequest, JobError, JobView, Usage


def new_job_fields(
    job_id: str, *, model: str, owner: str, created_at: float, request: GenerationRequest
) -> dict[str, str]:
    """The new job's hash (status ``queued``), which the ``submit`` script writes."""
    return {
        JobField.ID: job_id,
        JobField.MODEL: model,
        JobField.STATUS: JobStatus.QUEUED,
        JobField.OWNER: owner,
        JobField.CREATED_AT: repr(created_at),
        JobField.REQUEST: request.model_dump_json(),
    }


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def view_from_hash(job_id: str, fields: Mapping[str, str], text: str, position: int | None) -> JobView:
    """Build the public job view from the job's hash and text (both decoded to str)."""
    error = None
    if fields.get(JobField.ERROR_TYPE):
        error = JobError(
            type=fields[JobField.ERROR_TYPE],
            message=fields.get(JobField.ERROR_MESSAGE, ""),
            param=fields.get(JobField.ERROR_PARAM) or None,
            code=fields.get(JobField.ERROR_CODE) or None,
        )
    status = JobStatus(fields[JobField.STATUS])
    return JobView(
        id=job_id,
        model=fields.get(JobField.MODEL, ""),
        status=status,
        position=position if status == JobStatus.QUEUED else None,
        text=text,
        finish_reason=fields.get(JobField.FINISH_REASON) or None,
        usage=Usage(
            prompt_tokens=int(fields.get(JobField.PROMPT_TOKENS) or 0),
            completion_tokens=int(fields.get(JobField.COMPLETION_TOKENS) or 0),
        ),
        created_at=float(fields.get(JobField.CREATED_AT) or 0.0),
        started_at=_float(fields.get(JobField.STARTED_AT)),
        finished_at=_float(fields.get(JobField.FINISHED_AT)),
        worker=fields.get(JobField.WORKER) or None,
        error=error,
    )
