"""A job's outputs from a batched engine stepped by hand (tests/test_engine.py's ``drive``): the
outputs that were its own, and its answer's token ids."""

from __future__ import annotations

from typing import Any

from worker.engine import EngineJob, JobOutput


def outputs_of(seen: Any, j: EngineJob) -> list[JobOutput]:
    return [o for _, o in seen.outputs if o.job is j]


def ids_of(seen: Any, j: EngineJob) -> list[int]:
    return [t for o in outputs_of(seen, j) for t in o.token_ids]
