"""The vLLM tests' worker on the test stack (tests/conftest.py's), and what they ask of the job
API: a job submitted, its view, its events, and the log probabilities those carry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from harness.services import Service
from tests.conftest import Stack
from tests.sse import SSE, follow

MODEL = "vllm-tiny"
SLOTS = 2
MAX_LEN = 1024
VLLM_ENV = {
    "STREAMQ_ENGINE": "vllm",
    "STREAMQ_DTYPE": "float32",
    "STREAMQ_VLLM_EAGER": "1",
    "STREAMQ_KV_CACHE_GIB": "0.25",
    "STREAMQ_MAX_SEQ_LEN": str(MAX_LEN),
    "STREAMQ_LEASE_SECONDS": "2",
}


def start_vllm_worker(stack: Stack, model_dir: Path, name: str, **env: str) -> Service:
    args = ["worker", "--model", str(model_dir), "--served-name", MODEL, "--name", name]
    args += ["--slots", str(SLOTS)]
    service = Service(args, {**stack.env, **VLLM_ENV, **env}, name, stack.logdir)
    stack.services.append(service)
    return service


def serving(stack: Stack) -> int:
    return int(httpx.get(f"{stack.url}/readyz").json()["models"].get(MODEL, 0))


def submit(url: str, prompt: str | None, max_tokens: int, **fields: Any) -> str:
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, **fields}
    if prompt is not None:
        body["prompt"] = prompt
    response = httpx.post(f"{url}/v1/jobs", json=body, timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def logprobs_of(events: list[SSE]) -> list[dict[str, Any]]:
    """Every answer token's entry, in order, from the job's delta events."""
    return [entry for e in events if e.event == "delta" for entry in e.data.get("logprobs") or []]


def prompt_logprobs_of(events: list[SSE]) -> list[list[dict[str, Any] | None]]:
    """The prompt's entries, as often as the stream carried them (once)."""
    return [e.data["prompt_logprobs"] for e in events if e.event == "delta" and "prompt_logprobs" in e.data]


def spelled(entries: list[dict[str, Any]], special: set[str]) -> str:
    """The text the entries' bytes make, as the answer's text is made: without special tokens
    (a random model may pick one; its entry names it), and a random model's tokens need not
    make valid UTF-8."""
    kept = [bytes(e["bytes"]) for e in entries if e["token"] not in special]
    return b"".join(kept).decode("utf-8", errors="replace")


def refused_start(stack: Stack, model: Path, **env: str | None) -> str:
    """``streamq worker`` with the vLLM engine on ``model`` (with ``env`` over the tests'; None
    unsets a variable): it
    must stop before vLLM starts, with exit code 1 and a one-line reason (no traceback), which
    is returned."""
    import subprocess
    import sys

    from tests.processes import ROOT

    args = ["worker", "--model", str(model), "--served-name", "vllm-refused"]
    done = subprocess.run(
        [sys.executable, "-m", "streamq", *args],
        env={k: v for k, v in {**os.environ, **stack.env, **VLLM_ENV, **env}.items() if v is not None},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("streamq worker: cannot serve"), last
    return last


def token_of(model: Path, text: str) -> int:
    """The id of a token of the model's tokenizer that is ``text`` alone (a tab, say)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return next(i for i in range(len(tokenizer)) if tokenizer.decode([i]) == text)


def view(stack: Stack, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{stack.url}/v1/jobs/{job_id}", timeout=10).json())


def streamed(stack: Stack, job_id: str) -> list[SSE]:
    with httpx.Client(timeout=300) as client:
        return follow(client, stack.url2, job_id)
