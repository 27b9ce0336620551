"""The web chat page in headless Chromium (Debian's chromium + chromium-driver, driven by
selenium): ask, watch the answer grow, stop it (the job is canceled on the server), go on with
the conversation; a front restarted mid-answer is ridden out. The README's screenshot comes from
here: set STREAMQ_WEB_SCREENSHOT=docs/web-chat.png to keep it."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from harness.services import Service, start_front
from tests.conftest import SLOW_TOKENS_PER_SECOND, SlowStack
from tests.processes import restart_front_soon
from tests.web_page import PAGE_MARKS, answers, ask, open_on, open_page, state_of, text_of, until

pytestmark = PAGE_MARKS


def test_the_page_streams_an_answer_stops_it_and_keeps_the_conversation(
    browser: Any, slow_stack: SlowStack, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, slow_stack, slow_stack.url)
    assert browser.execute_script("return localStorage.getItem('streamq.apiKey')") == slow_stack.api_key

    first_question = "How do I make text <b>bold</b> in HTML, and what does <script> do?"
    first = ask(browser, first_question, 6)
    until(browser, lambda: state_of(first) == "done", "the first answer to finish")
    first_id = first.get_attribute("data-job-id")
    first_job = slow_stack.job(first_id)
    assert first_job["status"] == "finished" and text_of(first) == first_job["text"]
    # Text stays text: the question shows as typed, and no element came out of it.
    users = browser.find_elements(By.CSS_SELECTOR, "#log .msg.user .body")
    assert users[0].get_attribute("textContent") == first_question
    assert browser.find_elements(By.CSS_SELECTOR, "#log b, #log script") == []

    long = ask(browser, "Now tell me a long story.", 30 * SLOW_TOKENS_PER_SECOND)
    grown = until(
        browser, lambda: len(text_of(long).split()) >= 40 and len(text_of(long)), "the answer to run"
    )
    until(browser, lambda: len(text_of(long)) > grown, "the answer to grow")
    assert "Generating" in long.find_element(By.CSS_SELECTOR, ".status").text
    shot = Path(os.environ.get("STREAMQ_WEB_SCREENSHOT") or tmp_path / "web-chat.png")
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"

    browser.find_element(By.ID, "stop").click()
    until(browser, lambda: state_of(long) == "canceled", "the answer to stop")
    long_id = long.get_attribute("data-job-id")
    stopped = slow_stack.job(long_id)
    assert stopped["status"] == "canceled" and stopped["finish_reason"] == "canceled"
    assert text_of(long) == stopped["text"]  # every word the job wrote, once

    third = ask(browser, "And a short one?", 3)
    until(browser, lambda: state_of(third) == "done", "the third answer to finish")
    # The conversation goes on from the finished exchange; the stopped one is left out.
    assert slow_stack.asked(third.get_attribute("data-job-id")) == [
        ("user", first_question),
        ("assistant", first_job["text"]),
        ("user", "And a short one?"),
    ]

    browser.refresh()  # the key is still there after a reload
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == slow_stack.api_key


def test_the_page_rides_out_a_front_restart_mid_answer(browser: Any, slow_stack: SlowStack) -> None:
    front, url = start_front(slow_stack.env, slow_stack.logdir, "page-front")
    fronts: list[Service] = [front]
    try:
        open_page(browser, slow_stack, url)
        tokens = 8 * SLOW_TOKENS_PER_SECOND
        answer = ask(browser, "Keep going through a restart.", tokens)
        until(browser, lambda: len(text_of(answer).split()) >= 5, "the answer to start")
        front.proc.send_signal(signal.SIGKILL)
        front.stop()
        restart = restart_front_soon(slow_stack.env, slow_stack.logdir, "page-front-2", url, fronts)
        ended = ("done", "error", "canceled")
        until(browser, lambda: state_of(answer) in ended, "the answer to end", timeout=90)
        restart.join()
        job = slow_stack.job(answer.get_attribute("data-job-id"))
        assert state_of(answer) == "done" and job["status"] == "finished"
        assert text_of(answer) == job["text"] and len(job["text"].split()) == tokens
    finally:
        for service in fronts:
            service.stop()


def test_a_reload_mid_answer_shows_the_conversation_again_and_follows_the_answer_on(
    browser: Any, slow_stack: SlowStack
) -> None:
    """A reload lost the conversation, and the running job went on unseen (taking its slot)."""
    from selenium.webdriver.common.by import By

    open_page(browser, slow_stack, slow_stack.url)
    first = ask(browser, "A short one first.", 3)
    until(browser, lambda: state_of(first) == "done", "the first answer to finish")
    first_text = text_of(first)
    tokens = 6 * SLOW_TOKENS_PER_SECOND
    long = ask(browser, "Then a longer one.", tokens)
    until(browser, lambda: len(text_of(long).split()) >= 5, "the answer to run")
    job_id = long.get_attribute("data-job-id")

    browser.refresh()
    until(
        browser,
        lambda: len(answers(browser)) == 2 and state_of(answers(browser)[-1]) == "done",
        "the answer to go on to its end after the reload",
        timeout=60,
    )
    before, after = answers(browser)
    assert text_of(before) == first_text and state_of(before) == "done"
    assert after.get_attribute("data-job-id") == job_id  # the same job followed, not sent again
    job = slow_stack.job(job_id)
    assert (
        job["status"] == "finished" and text_of(after) == job["text"] and len(job["text"].split()) == tokens
    )
    questions = browser.find_elements(By.CSS_SELECTOR, "#log .msg.user .body")
    assert [q.get_attribute("textContent") for q in questions] == ["A short one first.", "Then a longer one."]

    third = ask(browser, "And one more.", 3)  # the conversation goes on from both exchanges
    until(browser, lambda: state_of(third) == "done", "the third answer to finish")
    assert slow_stack.asked(third.get_attribute("data-job-id")) == [
        ("user", "A short one first."),
        ("assistant", first_text),
        ("user", "Then a longer one."),
        ("assistant", job["text"]),
        ("user", "And one more."),
    ]
    # What the tab kept, spoilt (another version of the page, a hand): the page starts anew.
    spoilt = '{"history": [null], "shown": [null, 5], "pending": {"jobId": 7, "body": {}}}'
    browser.execute_script("sessionStorage.setItem('streamq.chat', arguments[0])", spoilt)
    browser.refresh()
    fresh = ask(browser, "After a store that could not be read.", 3)
    until(browser, lambda: state_of(fresh) == "done", "an answer after the page started anew")
    assert slow_stack.asked(fresh.get_attribute("data-job-id")) == [
        ("user", "After a store that could not be read.")
    ]


def test_the_page_shows_the_queue_position_while_the_job_waits(browser: Any, slow_stack: SlowStack) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, slow_stack, slow_stack.url)
    blockers = slow_stack.fill_slots()
    try:
        answer = ask(browser, "Are you busy?", 3)
        status = answer.find_element(By.CSS_SELECTOR, ".status")
        until(browser, lambda: "Queued · next in line" in status.text, "the queue position")
        assert state_of(answer) == "queued"
        slow_stack.cancel(blockers)
        until(browser, lambda: state_of(answer) == "done", "the answer once a slot is free")
        assert len(text_of(answer).split()) == 3
    finally:
        slow_stack.cancel(blockers)


def test_stop_pressed_while_the_question_is_still_being_sent_cancels_the_job(
    browser: Any, slow_stack: SlowStack
) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, slow_stack, slow_stack.url)
    # A slow network: the POST that creates the job takes a second and a half to come back.
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 1500, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    answer = ask(browser, "stop me before I start", 20 * SLOW_TOKENS_PER_SECOND)
    assert answer.get_attribute("data-job-id") in (None, ""), "the job id is not back yet"
    browser.find_element(By.ID, "stop").click()
    until(browser, lambda: state_of(answer) in ("canceled", "done", "error"), "the answer to end", timeout=60)
    assert state_of(answer) == "canceled"
    assert slow_stack.job(str(answer.get_attribute("data-job-id")))["status"] == "canceled"


def test_the_page_shows_text_with_line_separators_and_carriage_returns_whole(
    browser: Any, slow_stack: SlowStack
) -> None:
    """U+2028, U+2029, U+0085, CR+LF pairs and lone CRs reach the page's answer exactly (issue 19)."""
    from harness.services import start_synthetic_worker
    from tests.separator_text import EXPECTED, TEXT, TOKENS

    model = "separators-web"
    env = {**slow_stack.env, "STREAMQ_SYNTHETIC_TEXT": TEXT}
    worker = start_synthetic_worker(env, slow_stack.logdir, model, "separators-web-1", tokens_per_second=200)
    try:
        open_on(browser, slow_stack, model)
        answer = ask(browser, "hi", TOKENS)
        until(browser, lambda: state_of(answer) == "done", "the answer to finish")
        job = slow_stack.job(answer.get_attribute("data-job-id"))
        assert job["model"] == model and job["text"] == EXPECTED
        assert text_of(answer) == EXPECTED
    finally:
        worker.stop()


@pytest.mark.parametrize("refused_by", ["front", "worker"])
def test_the_page_leaves_out_the_oldest_exchange_once_the_conversation_outgrows_the_context(
    browser: Any, slow_stack: SlowStack, tiny_model: Path, refused_by: str
) -> None:
    """As the terminal chat does: the next question goes with the oldest exchange left out, and
    the page says so under the answer (every question was refused until "New chat"). The front
    refuses it at submit (a 400) when a worker counts the prompt in time; with none live to count
    it (a front that scales to zero, between workers), the job's worker refuses it (an error
    event in the stream), and the page sends it again all the same."""
    import httpx
    from selenium.webdriver.common.by import By

    from harness.services import wait_for
    from shared import keys
    from shared.job_store.vocabulary import JobField

    model = f"short-context-{refused_by}"  # the tiny model, a context of 256 tokens: two exchanges do not fit
    env = {**slow_stack.env, "STREAMQ_MAX_SEQ_LEN": "256"}

    def worker(name: str) -> Service:
        args = ["worker", "--model", str(tiny_model), "--served-name", model, "--name", name]
        return Service(args, env, name, slow_stack.logdir)

    services = [worker(f"{model}-1")]
    try:
        open_on(browser, slow_stack, model, wait=90)
        url = slow_stack.url
        if refused_by == "worker":  # a front that queues jobs for the model while no worker is live
            scaling = {"STREAMQ_SCALE_TO_ZERO": "1", "STREAMQ_MODELS": model, "STREAMQ_COUNT_TIMEOUT": "0.5"}
            front, url = start_front({**slow_stack.env, **scaling}, slow_stack.logdir, "scaling-front")
            services.append(front)
            open_page(browser, slow_stack, url)
            browser.execute_script("document.getElementById('model').value = arguments[0];", model)
        first = ask(browser, "the " * 90, 100)  # about 90 tokens, and its answer
        until(browser, lambda: state_of(first) in ("done", "error"), "the first answer", timeout=60)
        assert state_of(first) == "done" and not first.find_elements(By.CSS_SELECTOR, ".note")
        if refused_by == "worker":
            services.pop(0).stop()
            wait_for(lambda: not httpx.get(f"{url}/readyz").json()["models"].get(model), 30, "no live worker")
        second = ask(browser, "a " * 60, 100)
        if refused_by == "worker":
            until(browser, lambda: second.get_attribute("data-job-id"), "the question queued")
            services.append(worker(f"{model}-2"))  # takes the job, refuses it; counts the next try
        until(browser, lambda: state_of(second) in ("done", "error"), "the second answer", timeout=90)
        assert state_of(second) == "done", second.find_element(By.CSS_SELECTOR, ".status").text
        note = second.find_element(By.CSS_SELECTOR, ".note").text
        assert note == "The conversation outgrew the model's context: its 1 oldest exchange was left out."
        asked = slow_stack.asked(str(second.get_attribute("data-job-id")))
        assert [(role, content.strip()) for role, content in asked] == [("user", ("a " * 60).strip())]
        redis = slow_stack.redis.client(decode_responses=True)
        failed = [
            job
            for key in redis.scan_iter(keys.job("*"))
            if (job := redis.hgetall(key)).get("model") == model and job.get("status") == "failed"
        ]
        # The worker's refusal of the whole conversation: the page's first try.
        assert [job.get(JobField.ERROR_CODE) for job in failed] == (
            ["context_length_exceeded"] if refused_by == "worker" else []
        )
    finally:
        for service in reversed(services):
            service.stop()
