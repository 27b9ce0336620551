"""A prompt that cannot fit its model's context is refused at submit, counted with the worker's
own tokenizer (the front asks a worker when the text might not fit), with OpenAI's words and
code on every route, and leaves nothing behind; one that fits is answered within max_length."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from shared import keys
from shared.schemas import ChatMessage, PromptInput
from tests.conftest import Stack
from tests.sse import follow
from tests.stack_jobs import job_records, submit

pytestmark = pytest.mark.e2e


def test_prompt_length_limits_are_checked_with_the_workers_tokenizer(stack: Stack, tiny_backend: Any) -> None:
    prompt = "a prompt of several tokens"
    prompt_tokens = len(tiny_backend.encode(PromptInput(messages=[ChatMessage(role="user", content=prompt)])))
    before = job_records(stack)
    with httpx.Client(timeout=30) as client:
        refused = client.post(f"{stack.url}/v1/jobs", json={"prompt": prompt, "max_length": prompt_tokens})
        assert refused.status_code == 400
        assert refused.json()["error"] == {
            "message": f"max_length ({prompt_tokens}) must be greater than the prompt's length "
            f"({prompt_tokens} tokens)",
            "type": "invalid_request_error",
            "param": "max_length",
            "code": None,
        }
        huge = client.post(f"{stack.url}/v1/jobs", json={"prompt": "Redis streams " * 3000, "max_tokens": 5})
        assert huge.status_code == 400 and huge.json()["error"]["param"] == "messages"
        assert huge.json()["error"]["message"].startswith(
            "This model's maximum context length is 4096 tokens. However, the messages resulted in "
        )
        assert huge.json()["error"]["code"] == "context_length_exceeded"
        # Fewer characters than the context but more tokens: the front counts UTF-8 bytes, not
        # characters, to know it must ask (it took 2,000 CJK characters, and the job failed later).
        hanzi = "".join(chr(0x4E00 + i * 7919 % 20000) for i in range(2000))
        tokens = len(tiny_backend.encode(PromptInput(messages=[ChatMessage(role="user", content=hanzi)])))
        assert len(hanzi) + 300 < 4096 < tokens
        cjk = client.post(f"{stack.url}/v1/jobs", json={"prompt": hanzi, "max_tokens": 5})
        assert cjk.status_code == 400 and cjk.json()["error"]["code"] == "context_length_exceeded", cjk.text
        # A max_tokens the client set must fit beside the prompt (OpenAI's rule, words and code).
        asked = 4096  # the whole context for the answer alone
        chat = {"model": stack.model_dir.name, "messages": [{"role": "user", "content": prompt}]}
        over = client.post(f"{stack.url}/v1/chat/completions", json=chat | {"max_tokens": asked})
        assert over.status_code == 400, over.text
        error = over.json()["error"]
        assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded"), error
        assert error["message"].startswith(
            f"This model's maximum context length is 4096 tokens. However, you requested "
            f"{prompt_tokens + asked} tokens ({prompt_tokens} in the messages, {asked} in the completion)."
        )
        # Named as sent: the chat route's newer field, and the completions route's prompt.
        newer = client.post(f"{stack.url}/v1/chat/completions", json=chat | {"max_completion_tokens": asked})
        assert newer.status_code == 400 and newer.json()["error"]["param"] == "max_completion_tokens"
        assert newer.json()["error"]["message"].endswith("completion ('max_completion_tokens').")
        raw = {"model": stack.model_dir.name, "prompt": prompt, "max_tokens": asked}
        over_c = client.post(f"{stack.url}/v1/completions", json=raw)
        assert over_c.status_code == 400 and over_c.json()["error"]["code"] == "context_length_exceeded"
        assert " in the prompt, " in over_c.json()["error"]["message"], over_c.text
        responses = {"model": stack.model_dir.name, "input": prompt, "max_output_tokens": asked}
        over_r = client.post(f"{stack.url}/v1/responses", json=responses)
        assert over_r.status_code == 400, over_r.text
        assert over_r.json()["error"]["param"] == "max_output_tokens"
        assert "'max_output_tokens'" in over_r.json()["error"]["message"]
        assert " in the input, " in over_r.json()["error"]["message"]
        assert job_records(stack) - before == set()  # nothing was created for any of them

        job = submit(client, stack.url, prompt=prompt, max_length=prompt_tokens + 3, temperature=0)
        # The records a refused request must not leave are what an accepted one does leave.
        made = job_records(stack) - before
        assert keys.job(job["id"]) in made and keys.rq_job(job["id"]) in made
        done = follow(client, stack.url, job["id"])[-1]
        assert done.event == "done" and done.data["usage"]["completion_tokens"] <= 3
