"""The function RQ jobs name (``worker.tasks.generate``). The front enqueues it by name, so it
never imports this module (nor torch)."""

from __future__ import annotations

from rq import get_current_job

from worker import runtime

TASK = "worker.tasks.generate"


def generate(job_id: str) -> str:
    """Run job ``job_id`` on this process's loaded model; returns its final status."""
    rq_job = get_current_job()  # per thread: each slot runs its own
    slot = (rq_job.worker_name if rq_job is not None else None) or ""
    return runtime.current().run_job(job_id, slot)
