"""The web chat page reloaded while a question is being sent (headless Chromium): the job was
made, its id had not come back. The page sends the question again with its Idempotency-Key and
follows the one job the first send made, rather than losing the question (or making a second
job). A reload keeps the model and the answer's length chosen."""

from __future__ import annotations

import uuid
from typing import Any

from tests.conftest import SLOW_TOKENS_PER_SECOND, SlowStack
from tests.processes import jobs_asking
from tests.test_web_chat import _answers, _ask, _open, _open_on, _state, _text, browser, pytestmark, until

__all__ = ["browser", "pytestmark"]  # the fixture and the marks of the page's tests, used here too


def test_a_reload_while_the_question_is_sent_follows_the_job_it_made(
    browser: Any, slow_stack: SlowStack
) -> None:
    from selenium.webdriver.common.by import By

    _open(browser, slow_stack, slow_stack.url)
    marker = f"sent-once-{uuid.uuid4().hex[:8]}"
    # The answers to POST /v1/jobs are held in the browser: the front has made the job, the page
    # does not hear of it.
    held = {"patterns": [{"urlPattern": "*/v1/jobs", "requestStage": "Response"}]}
    browser.execute_cdp_cmd("Fetch.enable", held)
    tokens = 3 * SLOW_TOKENS_PER_SECOND
    answer = _ask(browser, f"{marker} a question", tokens)
    until(browser, lambda: len(jobs_asking(slow_stack.redis, marker)) == 1, "the job the held request made")
    (job_id,) = jobs_asking(slow_stack.redis, marker)
    assert not answer.get_attribute("data-job-id"), "the job id is not back yet"

    browser.refresh()  # the page sends it again on loading: held too, then let through
    browser.execute_cdp_cmd("Fetch.disable", {})
    until(
        browser,
        lambda: _answers(browser) and _state(_answers(browser)[-1]) == "done",
        "the answer after the reload",
        timeout=60,
    )
    (after,) = _answers(browser)
    assert after.get_attribute("data-job-id") == job_id
    assert jobs_asking(slow_stack.redis, marker) == [job_id]  # no second job
    job = slow_stack.job(job_id)
    assert _text(after) == job["text"] and len(job["text"].split()) == tokens
    questions = browser.find_elements(By.CSS_SELECTOR, "#log .msg.user .body")
    assert [q.get_attribute("textContent") for q in questions] == [f"{marker} a question"]


def test_a_reload_keeps_the_model_and_the_answer_length_chosen(browser: Any, slow_stack: SlowStack) -> None:
    """After a reload the page picked the first model listed and forgot Max tokens: the next
    question went to another model, with the conversation the chosen one had written."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from streamq.processes import start_synthetic_worker

    model = "zz-chosen"  # listed after the stack's own model
    worker = start_synthetic_worker(
        slow_stack.env, slow_stack.logdir, model, "chosen-1", tokens_per_second=200
    )
    try:
        _open_on(browser, slow_stack, model)
        first = _ask(browser, "one", 4)
        until(browser, lambda: _state(first) == "done", "the first answer")
        browser.refresh()
        chosen = "return document.getElementById('model').value"
        until(browser, lambda: browser.execute_script(chosen) == model, "the chosen model after the reload")
        assert browser.find_element(By.ID, "max-tokens").get_attribute("value") == "4"
        browser.find_element(By.ID, "question").send_keys("two", Keys.ENTER)
        second = until(browser, lambda: len(_answers(browser)) == 2 and _answers(browser)[-1], "the answer")
        until(browser, lambda: _state(second) == "done", "the second answer")
        job = slow_stack.job(second.get_attribute("data-job-id"))
        assert job["model"] == model and job["usage"]["completion_tokens"] == 4, job
    finally:
        worker.stop()
