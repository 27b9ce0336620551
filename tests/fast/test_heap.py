"""A served front settles its heap once the job system is open: what it holds at start-up is
frozen out of the garbage collector's sight and young collections come every
``STREAMQ_GC_YOUNG_THRESHOLD`` allocations. Each case runs in a fresh interpreter, so the test
process keeps Python's own collector settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.processes import ROOT

_FRONT = """
import asyncio, gc, json, sys
from api.app import create_app
from api.auth import ApiKeys
from tests.fast.memory_jobs import MemoryJobClient

async def main(settle):
    app = create_app(None, ApiKeys([]), open_jobs=MemoryJobClient.opener(), settle_heap_at_start=settle)
    async with app.router.lifespan_context(app):
        return {"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()[0]}

print(json.dumps(asyncio.run(main(sys.argv[1] == "settle"))))
"""


def _front_gc(mode: str, **env: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _FRONT, mode],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(("setting", "threshold"), [("", 10_000), ("2500", 2500), ("0", 700)])
def test_a_served_front_freezes_its_start_up_heap(setting: str, threshold: int) -> None:
    env = {"STREAMQ_GC_YOUNG_THRESHOLD": setting} if setting else {}
    settled = _front_gc("settle", **env)
    assert settled["frozen"] > 10_000  # the app, its routes, pydantic's schemas, the modules
    assert settled["threshold"] == threshold


def test_an_app_built_in_process_leaves_the_collector_alone() -> None:
    """Tests and embedders build apps in their own process: none of them freezes that heap."""
    assert _front_gc("plain") == {"frozen": 0, "threshold": 700}
