"""The web chat page reloaded while a question is being sent (headless Chromium): the job was
made, its id had not come back. The page sends the question again with its Idempotency-Key and
follows the one job the first send made, rather than losing the question (or making a second
job). A reload keeps the model and the answer's length chosen. A stream that went silent (a
front that froze, a path that dropped it without a reset) is resumed on a new connection."""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Any

from tests.conftest import SLOW_TOKENS_PER_SECOND, SlowStack
from tests.processes import jobs_asking
from tests.tcp_proxy import TcpProxy
from tests.web_page import PAGE_MARKS, answers, ask, open_on, open_page, state_of, text_of, until

pytestmark = PAGE_MARKS


def test_a_reload_while_the_question_is_sent_follows_the_job_it_made(
    browser: Any, slow_stack: SlowStack
) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, slow_stack, slow_stack.url)
    marker = f"sent-once-{uuid.uuid4().hex[:8]}"
    # The answers to POST /v1/jobs are held in the browser: the front has made the job, the page
    # does not hear of it.
    held = {"patterns": [{"urlPattern": "*/v1/jobs", "requestStage": "Response"}]}
    browser.execute_cdp_cmd("Fetch.enable", held)
    tokens = 3 * SLOW_TOKENS_PER_SECOND
    answer = ask(browser, f"{marker} a question", tokens)
    until(browser, lambda: len(jobs_asking(slow_stack.redis, marker)) == 1, "the job the held request made")
    (job_id,) = jobs_asking(slow_stack.redis, marker)
    assert not answer.get_attribute("data-job-id"), "the job id is not back yet"

    browser.refresh()  # the page sends it again on loading: held too, then let through
    browser.execute_cdp_cmd("Fetch.disable", {})
    until(
        browser,
        lambda: answers(browser) and state_of(answers(browser)[-1]) == "done",
        "the answer after the reload",
        timeout=60,
    )
    (after,) = answers(browser)
    assert after.get_attribute("data-job-id") == job_id
    assert jobs_asking(slow_stack.redis, marker) == [job_id]  # no second job
    job = slow_stack.job(job_id)
    assert text_of(after) == job["text"] and len(job["text"].split()) == tokens
    questions = browser.find_elements(By.CSS_SELECTOR, "#log .msg.user .body")
    assert [q.get_attribute("textContent") for q in questions] == [f"{marker} a question"]


def test_a_reload_keeps_the_model_and_the_answer_length_chosen(browser: Any, slow_stack: SlowStack) -> None:
    """After a reload the page picked the first model listed and forgot Max tokens: the next
    question went to another model, with the conversation the chosen one had written."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from harness.services import start_synthetic_worker

    model = "zz-chosen"  # listed after the stack's own model
    worker = start_synthetic_worker(
        slow_stack.env, slow_stack.logdir, model, "chosen-1", tokens_per_second=200
    )
    try:
        open_on(browser, slow_stack, model)
        first = ask(browser, "one", 4)
        until(browser, lambda: state_of(first) == "done", "the first answer")
        browser.refresh()
        chosen = "return document.getElementById('model').value"
        until(browser, lambda: browser.execute_script(chosen) == model, "the chosen model after the reload")
        assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == "4"
        browser.find_element(By.ID, "question").send_keys("two", Keys.ENTER)
        second = until(browser, lambda: len(answers(browser)) == 2 and answers(browser)[-1], "the answer")
        assert second is not False  # until answers what its condition gave once true: the element
        until(browser, lambda: state_of(second) == "done", "the second answer")
        job = slow_stack.job(second.get_attribute("data-job-id"))
        assert job["model"] == model and job["usage"]["completion_tokens"] == 4, job
    finally:
        worker.stop()


class _StallingProxy(TcpProxy):
    """A TCP proxy to a front whose open connections can be made to pass nothing from then on,
    both ways, without a close or a reset (a path that lost them); new connections pass."""

    def __init__(self, upstream: str) -> None:
        self._stalled: list[threading.Event] = []
        super().__init__(upstream)

    def serve(self, client: socket.socket, number: int) -> None:
        upstream = socket.create_connection(self.upstream)
        stalled = threading.Event()
        self._stalled.append(stalled)
        threading.Thread(target=self.pipe, args=(client, upstream, stalled), daemon=True).start()
        self.pipe(upstream, client, stalled)

    def stall(self) -> None:
        for stalled in self._stalled:
            stalled.set()


def test_a_stream_that_went_silent_is_resumed_on_a_new_connection(
    browser: Any, slow_stack: SlowStack
) -> None:
    """A front that froze, or a path that dropped the stream without a reset: the page waited
    for ever ("Generating…" with the job long finished). A stream silent for twice the front's
    keep-alive interval and 5 s is taken for lost, and resumed after its last event."""
    from harness.services import start_front

    front, url = start_front(
        {**slow_stack.env, "STREAMQ_PING_INTERVAL": "1"}, slow_stack.logdir, "pinging-front"
    )
    proxy = _StallingProxy(url)
    try:
        open_page(browser, slow_stack, proxy.url)
        tokens = 8 * SLOW_TOKENS_PER_SECOND
        answer = ask(browser, "A long one.", tokens)
        until(browser, lambda: len(text_of(answer).split()) >= 5, "the answer to run")
        before = proxy.connections
        proxy.stall()
        until(
            browser, lambda: state_of(answer) == "done", "the answer to its end after the stall", timeout=60
        )
        job = slow_stack.job(answer.get_attribute("data-job-id"))
        assert job["status"] == "finished" and len(job["text"].split()) == tokens
        assert text_of(answer) == job["text"]  # nothing lost, nothing twice
        assert proxy.connections > before  # a new connection took the stream on
    finally:
        proxy.close()
        front.stop()
