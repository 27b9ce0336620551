"""``Idempotency-Key`` on job creation, end to end (real fronts, Redis, a synthetic worker): a
request sent again gets the job the first one made, once, whichever front it reaches; the key
with another request, another API key's same key, and the routes that refuse it. The Python
client sends a submit again, with one key, when its connection drops before the answer."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from shared import keys
from shared.job_store import scripts
from shared.job_store.scripts import JobScripts
from streamq import StreamqClient
from streamq.errors import StreamqError
from tests.conftest import SlowStack
from tests.processes import jobs_asking
from tests.secure_stack import KEYS, RATE, SecureStack, headers
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e


def _post(url: str, who: str, body: dict[str, Any], key: str | None) -> httpx.Response:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return httpx.post(f"{url}/v1/jobs", json=body, headers=headers(who) | extra, timeout=30)


def test_a_job_sent_again_with_its_key_is_the_same_job_on_any_front(secure: SecureStack) -> None:
    marker = f"once-{uuid.uuid4().hex[:8]}"
    body = {"prompt": f"{marker} please", "max_tokens": 3}
    key = str(uuid.uuid4())
    first = _post(secure.a, "dave", body, key)
    assert first.status_code == 202, first.text
    assert "Idempotent-Replayed" not in first.headers
    job_id = first.json()["id"]
    again = _post(secure.b, "dave", body, key)  # the other front
    assert again.status_code == 202, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == job_id and again.headers["Location"] == f"/v1/jobs/{job_id}"
    assert jobs_asking(secure.redis, marker) == [job_id]

    # Sent at once by several clients (a retry storm): still one job, which runs once.
    burst_key = str(uuid.uuid4())
    burst_body = {"prompt": f"{marker} burst", "max_tokens": 3}
    with ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(lambda url: _post(url, "dave", burst_body, burst_key), [secure.a, secure.b] * 3)
        )
    assert [a.status_code for a in answers] == [202] * 6, [a.text for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 5
    (burst_id,) = ids
    with httpx.stream(
        "GET", f"{secure.a}/v1/jobs/{burst_id}/events", headers=headers("dave"), timeout=30
    ) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("event:")]
    assert events.count("event: started") == 1 and events[-1] == "event: done", events

    # Once it has ended, the key still answers it (finished), and makes no new job.
    ended = _post(secure.a, "dave", burst_body, burst_key)
    assert ended.status_code == 202 and ended.json()["id"] == burst_id
    assert ended.json()["status"] == "finished" and ended.json()["text"]
    assert jobs_asking(secure.redis, f"{marker} burst") == [burst_id]


def test_a_key_with_another_request_or_another_api_key(secure: SecureStack) -> None:
    key = str(uuid.uuid4())
    body = {"prompt": "the first question", "max_tokens": 2}
    made = _post(secure.a, "erin", body, key)
    assert made.status_code == 202, made.text

    other = _post(secure.a, "erin", {"prompt": "another question", "max_tokens": 2}, key)
    assert other.status_code == 400
    error = other.json()["error"]
    assert error["param"] == "Idempotency-Key" and error["code"] == "idempotency_key_reused"
    changed = _post(secure.a, "erin", body | {"max_tokens": 3}, key)  # a sampling field counts too
    assert changed.status_code == 400 and changed.json()["error"]["code"] == "idempotency_key_reused"

    # Another API key's same key is its own job: never the first key's job (nor its answer).
    theirs = _post(secure.a, "frank", body, key)
    assert theirs.status_code == 202 and "Idempotent-Replayed" not in theirs.headers
    assert theirs.json()["id"] != made.json()["id"]


def test_a_request_sent_again_is_answered_past_the_rate_limit(secure: SecureStack) -> None:
    """The rate limit counts jobs asked for: one sent again, whose job exists, is answered (a 429
    there would leave its client without the job its first send made)."""
    body = {"prompt": "rate", "max_tokens": 1}
    key = str(uuid.uuid4())
    made = _post(secure.a, "kate", body, key)
    assert made.status_code == 202, made.text
    statuses = [_post(secure.a, "kate", body, None).status_code for _ in range(RATE)]
    assert statuses[-1] == 429, statuses  # the key's rate is used up
    again = _post(secure.a, "kate", body, key)
    assert again.status_code == 202 and again.json()["id"] == made.json()["id"], again.text
    assert _post(secure.a, "kate", body, str(uuid.uuid4())).status_code == 429  # a new key: a new job


def test_a_withdrawn_job_is_made_anew_by_its_key(secure: SecureStack) -> None:
    """A front that refused a job after writing it (no Redis replica had it in time: a 503) marks
    it withdrawn; once it has ended, the key sent again makes it anew under the same id."""
    body = {"prompt": "withdrawn then made", "max_tokens": 40}
    key = str(uuid.uuid4())
    first = _post(secure.a, "lena", body, key).json()
    r = secure.redis.client(decode_responses=True)
    withdraw = scripts.cancel(first["id"], first["model"], ttl=600, maxlen=100, withdrawn=True)
    answer = scripts.answer(JobScripts(r).run(withdraw))  # as the front withdraws it, in one step
    assert answer in (scripts.Answer.OK, scripts.Answer.RUNNING)
    assert r.hget(keys.job(first["id"]), "withdrawn") == "1"
    if answer == scripts.Answer.RUNNING:  # its worker had started it: told, it stops at its next step
        r.publish(keys.CANCEL_CHANNEL, first["id"])
    again = _post(secure.b, "lena", body, key)
    assert again.status_code == 202 and "Idempotent-Replayed" not in again.headers, again.text
    assert again.json()["id"] == first["id"] and again.json()["status"] == "queued"
    with httpx.stream(
        "GET", f"{secure.a}/v1/jobs/{first['id']}/events", headers=headers("lena"), timeout=30
    ) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("event:")]
    assert events[0] == "event: queued" and events[-1] == "event: done", events  # no canceled before it
    assert not r.hget(keys.job(first["id"]), "withdrawn")


@pytest.mark.parametrize("bad", [b"", b"a\tb", b"x" * 256, "clé".encode()])
def test_a_key_that_is_not_one_is_a_400_naming_the_header(secure: SecureStack, bad: bytes) -> None:
    answer = httpx.post(
        f"{secure.a}/v1/jobs",
        json={"prompt": "hi", "max_tokens": 2},
        # httpx sends a bytes value as it is; its type takes no mix of str and bytes values.
        headers={**headers("dave"), "Idempotency-Key": bad},  # type: ignore[arg-type]
        timeout=30,
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "Idempotency-Key"


def test_routes_whose_job_lives_with_the_connection_refuse_the_key(secure: SecureStack) -> None:
    """There a job sent again would have been canceled when the first connection went away: the
    key is refused, not taken and ignored."""
    sdk = openai.OpenAI(base_url=f"{secure.a}/v1", api_key=KEYS["dave"], max_retries=0)
    key = {"Idempotency-Key": str(uuid.uuid4())}
    messages: Any = [{"role": "user", "content": "hi"}]
    calls = [
        lambda: sdk.chat.completions.create(
            model="synth", messages=messages, max_tokens=2, extra_headers=key
        ),
        lambda: sdk.completions.create(model="synth", prompt="hi", max_tokens=2, extra_headers=key),
        lambda: sdk.responses.create(model="synth", input="hi", max_output_tokens=16, extra_headers=key),
    ]
    for call in calls:
        with pytest.raises(openai.BadRequestError) as refused:
            call()
        assert refused.value.body["param"] == "Idempotency-Key", refused.value.body  # type: ignore[index]
    for path in ("/", "/stream"):
        seed = httpx.post(
            f"{secure.a}{path}",
            json={"prompt": "hi", "history": []},
            headers=headers("dave") | key,
            timeout=30,
        )
        assert seed.status_code == 400 and "Idempotency-Key" in seed.text, seed.text


def test_a_background_response_sent_again_with_its_key_is_the_same_response(secure: SecureStack) -> None:
    sdk = openai.OpenAI(base_url=f"{secure.b}/v1", api_key=KEYS["frank"], max_retries=0)
    key = {"Idempotency-Key": str(uuid.uuid4())}
    marker = f"resp-{uuid.uuid4().hex[:8]}"
    first = sdk.responses.create(
        model="synth", input=f"{marker} go", background=True, max_output_tokens=16, extra_headers=key
    )
    raw = sdk.responses.with_raw_response.create(
        model="synth", input=f"{marker} go", background=True, max_output_tokens=16, extra_headers=key
    )
    again = raw.parse()
    assert raw.headers["Idempotent-Replayed"] == "true"
    assert again.id == first.id and again.created_at == first.created_at
    done = sdk.responses.retrieve(first.id)
    for _ in range(100):
        if done.status not in ("queued", "in_progress"):
            break
        time.sleep(0.1)
        done = sdk.responses.retrieve(first.id)
    assert done.status == "incomplete" and done.output_text  # its 16 tokens: the synthetic model goes on
    assert len(jobs_asking(secure.redis, marker)) == 1

    # The same key with other metadata is another request; a deleted response is not made again.
    with pytest.raises(openai.BadRequestError) as reused:
        sdk.responses.create(
            model="synth", input=f"{marker} go", background=True, max_output_tokens=16,
            metadata={"a": "changed"}, extra_headers=key,
        )  # fmt: skip
    assert reused.value.body["code"] == "idempotency_key_reused"  # type: ignore[index]
    sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(
            model="synth", input=f"{marker} go", background=True, max_output_tokens=16, extra_headers=key
        )


class _LosingProxy(TcpProxy):
    """A TCP proxy to the front that, on its first connection only, passes the request on and
    then closes the connection without the answer: the reply lost after the job was made."""

    def __init__(self, upstream: str) -> None:
        self.lost = threading.Event()
        super().__init__(upstream)

    def serve(self, client: socket.socket, number: int) -> None:
        if number > 1:
            super().serve(client, number)
            return
        upstream = socket.create_connection(self.upstream)
        threading.Thread(target=self.pipe, args=(client, upstream), daemon=True).start()
        upstream.recv(65536)  # the front answered: the job exists
        self.lost.set()
        for s in (client, upstream):  # shutdown: close() would leave the other thread's recv
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@pytest.fixture
def losing_proxy(slow_stack: SlowStack) -> Iterator[_LosingProxy]:
    proxy = _LosingProxy(slow_stack.url)
    try:
        yield proxy
    finally:
        proxy.close()


def test_the_client_sends_a_submit_again_when_its_answer_is_lost_and_gets_one_job(
    slow_stack: SlowStack, losing_proxy: _LosingProxy
) -> None:
    marker = f"lost-{uuid.uuid4().hex[:8]}"
    with StreamqClient(losing_proxy.url, api_key=slow_stack.api_key) as client:
        view = client.chat(prompt=f"{marker} answer me", max_tokens=4)
    assert losing_proxy.lost.is_set() and losing_proxy.connections >= 2
    assert view.status == "finished" and len(view.text.split()) == 4
    assert jobs_asking(slow_stack.redis, marker) == [view.id]  # one job: the first send's


def test_the_client_gives_up_on_a_front_it_cannot_reach_after_a_few_sends() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    with StreamqClient(f"http://127.0.0.1:{port}") as client, pytest.raises(StreamqError) as gave_up:
        client.submit(prompt="anyone?")
    assert gave_up.value.type == "connection_error"
