"""The function RQ jobs name (``worker.tasks.generate``). The front enqueues it by name, so it
never imports this module (nor torch), and RQ keeps that name in every job it stores.

A streamq worker does not call it: its RQ adapter (``worker.rq_worker.StreamqJob``) runs a job
that names it on the worker's own engine. Any other RQ worker that takes such a job lands
here, and the job fails with this error.
"""

from __future__ import annotations

from shared.job_store.rq_records import TASK

__all__ = ["TASK", "generate"]


def generate(job_id: str) -> str:
    raise RuntimeError(
        f"job {job_id}: no model is loaded in this process: run jobs with `streamq worker` or "
        "`rq worker -w worker.rq_worker.StreamqWorker` (a plain `rq worker` cannot run them)"
    )
