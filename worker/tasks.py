"""The function RQ jobs name (``worker.tasks.generate``). The front enqueues it by name, so it
never imports this module (nor torch)."""

from __future__ import annotations

from worker import runtime

TASK = "worker.tasks.generate"


def generate(job_id: str) -> str:
    """Run job ``job_id`` on this process's loaded model; returns its final status."""
    return runtime.current().run_job(job_id)
