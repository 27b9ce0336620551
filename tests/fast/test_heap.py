"""A served front settles its heap once the job system is open: what it holds at start-up is
frozen out of the garbage collector's sight (``STREAMQ_GC_FREEZE``; given back as it stops) and
young collections come every ``STREAMQ_GC_YOUNG_THRESHOLD`` allocations. Each case runs in a
fresh interpreter, so the test process keeps Python's own collector settings."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import pytest

import api.app
import api.cli
from tests.processes import ROOT

_FRONT = """
import asyncio, gc, json, sys
python_default = gc.get_threshold()[0]
from api.app import create_app
from api.auth import ApiKeys
from tests.fast.memory_jobs import MemoryJobClient

async def main(settle):
    app = create_app(None, ApiKeys([]), open_jobs=MemoryJobClient.opener(), settle_heap_at_start=settle)
    async with app.router.lifespan_context(app):
        seen = {"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()[0],
                "python_default": python_default}
    return {**seen, "frozen_after_stop": gc.get_freeze_count()}

print(json.dumps(asyncio.run(main(sys.argv[1] == "settle"))))
"""


def _front_gc(mode: str, **env: str) -> dict[str, int]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMQ_GC_")}
    out = subprocess.run(
        [sys.executable, "-c", _FRONT, mode],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(("setting", "threshold"), [("", 10_000), ("2500", 2500), ("0", None)])
def test_a_served_front_freezes_its_start_up_heap(setting: str, threshold: int | None) -> None:
    settled = _front_gc("settle", **({"STREAMQ_GC_YOUNG_THRESHOLD": setting} if setting else {}))
    assert settled["frozen"] > 10_000  # the app, its routes, pydantic's schemas, the modules
    assert settled["threshold"] == (threshold or settled["python_default"])
    # Given back as the front stops: the interpreter's last collections free it.
    assert settled["frozen_after_stop"] == 0


def test_the_freeze_can_be_turned_off() -> None:
    settled = _front_gc("settle", STREAMQ_GC_FREEZE="false")
    assert settled["frozen"] == 0
    assert settled["threshold"] == 10_000


def test_an_app_built_in_process_leaves_the_collector_alone() -> None:
    """Tests and embedders build apps in their own process: none of them freezes that heap."""
    plain = _front_gc("plain")
    assert plain["frozen"] == 0
    assert plain["threshold"] == plain["python_default"]


def test_both_ways_streamq_api_serves_settle_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process (the app handed to uvicorn) and several (uvicorn's factory in each process)."""
    built: list[dict[str, Any]] = []
    served: list[Any] = []

    def create_app(*a: Any, **kw: Any) -> str:
        built.append(kw)
        return "app"

    monkeypatch.setattr(api.app, "create_app", create_app)
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: served.append(app))
    args = argparse.Namespace(host="127.0.0.1", port=0, log_level="warning", insecure=None, workers=1)
    assert api.cli.run(args) == 0
    assert served == ["app"]
    app: object = api.cli.front_process_app()  # what create_app, patched, answered
    assert app == "app"
    assert [kw.get("settle_heap_at_start") for kw in built] == [True, True]
