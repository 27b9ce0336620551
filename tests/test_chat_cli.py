"""`streamq chat` and `streamq ask` as a person (or a script) uses them: a real pseudo-terminal
(pexpect), a real front with an API key and a worker slow enough to be interrupted."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pexpect
import pyte
import pytest

from harness.services import Service, start_front, wait_for
from shared import keys
from shared.schemas import GenerationRequest
from tests.conftest import SLOW_TOKENS_PER_SECOND, SlowStack, Stack
from tests.processes import ROOT, restart_front_soon
from worker.synthetic import WORDS

pytestmark = pytest.mark.e2e

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-_]")
PROMPT = "you ›"
TOKENS = 6 * SLOW_TOKENS_PER_SECOND  # six seconds an answer: time to see it grow and stop it


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMQ_")}
    return {**env, "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1", **more}


def _words(text: str) -> str:
    return " ".join(ANSI.sub("", text).split())


def test_chat_streams_an_answer_ctrl_c_cancels_it_and_the_next_question_works(slow_stack: SlowStack) -> None:
    args = ["-m", "streamq", "chat", "--url", slow_stack.url, "--model", slow_stack.model]
    args += ["--max-tokens", str(TOKENS)]
    child = pexpect.spawn(
        sys.executable,
        args,
        cwd=str(ROOT),
        env=_env(STREAMQ_API_KEY=slow_stack.api_key),  # the key from the environment
        dimensions=(30, 90),
        encoding="utf-8",
        timeout=60,
    )
    screen = io.StringIO()
    child.logfile_read = screen
    try:
        child.expect_exact(PROMPT)
        child.sendline("tell me a long story")
        child.expect_exact("Ctrl-C to stop")  # the job started: the answer is streaming
        child.expect("lorem ipsum dolor sit amet")
        child.expect("consectetur adipiscing elit")  # ... and growing
        child.sendintr()  # Ctrl-C: stop this answer, not the program
        child.expect(r"stopped · job ([0-9a-f]+) canceled")
        stopped_id = child.match.group(1)
        shown = _words(screen.getvalue())
        child.expect_exact("(not kept in the conversation)")
        child.expect_exact(PROMPT)

        stopped = slow_stack.job(stopped_id)
        assert stopped["status"] == "canceled" and stopped["finish_reason"] == "canceled"
        partial = str(stopped["text"])
        assert 0 < len(partial.split()) < TOKENS
        # The answer on the screen ends where the job's text ended, then says how it ended.
        assert " ".join(partial.split()[-6:]) + " [stopped · job" in shown

        child.sendline("a second question")
        child.expect(r"length · (\d+) tokens · .* job ([0-9a-f]+)\]", timeout=60)
        assert int(child.match.group(1)) == TOKENS
        second_id = child.match.group(2)
        child.expect_exact(PROMPT)
        second = slow_stack.job(second_id)
        assert second["status"] == "finished" and len(str(second["text"]).split()) == TOKENS
        # The stopped answer (and its question) was left out of the conversation.
        assert slow_stack.asked(second_id) == [("user", "a second question")]

        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_ctrl_c_at_the_prompt_leaves_the_chat(slow_stack: SlowStack) -> None:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "streamq", "chat", "--url", slow_stack.url, "--api-key", slow_stack.api_key],
        cwd=str(ROOT),
        env=_env(),
        encoding="utf-8",
        timeout=30,
    )
    try:
        child.expect_exact(PROMPT)
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def _ask(slow: SlowStack, url: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "streamq", "ask", "--url", url or slow.url]
    return [*command, "--api-key", slow.api_key, "--model", slow.model]


def test_ask_in_a_pipe_prints_the_plain_answer(slow_stack: SlowStack) -> None:
    out = subprocess.run(
        [*_ask(slow_stack), "--max-tokens", "7", "what is lorem ipsum?"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout  # no terminal codes in a pipe
    assert out.stdout.endswith("\n") and len(out.stdout.split()) == 7
    bad = subprocess.run(
        [*_ask(slow_stack), "--temperature", "9", "hi"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1 and "temperature" in bad.stderr and bad.stdout == ""
    schemeless = subprocess.run(
        [sys.executable, "-m", "streamq", "ask", "--url", "localhost:8000", "hi"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert schemeless.returncode == 2 and "must start with http://" in schemeless.stderr, schemeless.stderr
    assert "Traceback" not in schemeless.stderr
    denied = subprocess.run(
        [*_ask(slow_stack), "hi", "--api-key", "not-the-key"],  # the last --api-key wins
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        denied.returncode == 1
        and "401 authentication_error" in denied.stderr
        and "--api-key" in denied.stderr
    )


def test_ask_rides_out_a_front_restart_without_losing_or_repeating_text(
    slow_stack: SlowStack, tmp_path: Path
) -> None:
    front, url = start_front(slow_stack.env, slow_stack.logdir, "ask-front")
    fronts: list[Service] = [front]
    tokens = 8 * SLOW_TOKENS_PER_SECOND
    errors = (tmp_path / "stderr").open("w")
    proc = subprocess.Popen(
        [*_ask(slow_stack, url), "--max-tokens", str(tokens), "keep going"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    try:
        assert proc.stdout is not None
        head = proc.stdout.read(40)  # the answer has begun
        front.proc.send_signal(signal.SIGKILL)
        front.stop()
        restart = restart_front_soon(slow_stack.env, slow_stack.logdir, "ask-front-2", url, fronts)
        rest = proc.stdout.read()  # to the end (the same buffered reader: nothing skipped)
        proc.wait(timeout=60)
        restart.join()
    finally:
        if proc.poll() is None:
            proc.kill()
        errors.close()
        for service in fronts:
            service.stop()
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    answer = head + rest
    words = answer.split()
    # A word per token, in the synthetic worker's cycle: none lost, none twice, across the cut.
    assert len(words) == tokens and answer.endswith("\n")
    assert all(WORDS.index(b) == (WORDS.index(a) + 1) % len(WORDS) for a, b in itertools.pairwise(words))


def test_ask_that_loses_its_front_for_good_fails_and_names_the_job(
    slow_stack: SlowStack, tmp_path: Path
) -> None:
    """A script must not take a cut-off answer for a whole one: exit 1, and say where the job is."""
    front, url = start_front(slow_stack.env, slow_stack.logdir, "lost-front")
    proc = subprocess.Popen(
        [*_ask(slow_stack, url), "--max-tokens", str(TOKENS), "--reconnects", "2", "keep going"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        head = proc.stdout.read(20)  # the answer has begun
        front.proc.send_signal(signal.SIGKILL)
        rest, errors = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        front.stop()
    assert proc.returncode == 1, errors
    assert 0 < len((head + rest).split()) < TOKENS
    assert "may still be running" in errors and "/v1/jobs/" in errors


def test_ask_in_a_terminal_shows_the_queue_position_while_the_job_waits(slow_stack: SlowStack) -> None:
    blockers = slow_stack.fill_slots()
    child = pexpect.spawn(
        sys.executable,
        [*_ask(slow_stack)[1:], "--max-tokens", "3", "are you busy?"],
        cwd=str(ROOT),
        env=_env(),
        dimensions=(24, 100),
        encoding="utf-8",
        timeout=60,
    )
    try:
        child.expect_exact("queued · no job ahead")  # every slot is taken: it waits first in line
        slow_stack.cancel(blockers)
        child.expect(r"length · 3 tokens")
        child.expect(pexpect.EOF)
    finally:
        slow_stack.cancel(blockers)
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.usefixtures("retire_extra_workers")
def test_chat_leaves_out_its_oldest_exchange_once_the_conversation_outgrows_the_context(
    stack: Stack,
) -> None:
    """A long chat outgrows the model's context: the next question is sent with the oldest
    exchange left out (the chat says so), not refused until /reset (a new user's trial was stuck
    there, every question answered with the server's 400)."""
    model = "short-context"  # the tiny model with a context of 256 tokens: two exchanges do not fit
    args = ["worker", "--model", str(stack.model_dir), "--served-name", model, "--name", "short-ctx"]
    worker = Service(args, {**stack.env, "STREAMQ_MAX_SEQ_LEN": "256"}, "short-ctx", stack.logdir)
    stack.services.append(worker)
    wait_for(lambda: model in httpx.get(f"{stack.url}/readyz").json()["models"], 90, "the worker")
    first, second = "the " * 90, "a " * 60  # about 90 and 60 tokens
    command = ["-m", "streamq", "chat", "--url", stack.url, "--model", model, "--max-tokens", "100"]
    child = pexpect.spawn(
        sys.executable, command, cwd=str(ROOT), env=_env(), dimensions=(30, 250), encoding="utf-8", timeout=60
    )
    try:
        child.expect_exact(PROMPT)
        child.sendline(first)
        child.expect(r"job ([0-9a-f]+)\]")
        child.expect_exact(PROMPT)
        child.sendline(second)
        child.expect_exact(
            "(the conversation outgrew the model's context: its 1 oldest exchange was left out)"
        )
        child.expect(r"(stop|length) · \d+ tokens · .* job ([0-9a-f]+)\]")
        answered = child.match.group(2)
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    job = httpx.get(f"{stack.url}/v1/jobs/{answered}").json()
    assert job["status"] == "finished"
    stored = stack.redis.client(decode_responses=True).hget(keys.job(answered), "request")
    asked = GenerationRequest.model_validate_json(str(stored)).messages
    assert [(m.role, m.content) for m in asked] == [("user", second.strip())]


def test_a_line_of_wide_characters_edited_in_place_shows_what_will_be_sent() -> None:
    """Line editing (readline) must know that the prompt's colour codes take no columns: it counted
    them, so moving about a line of CJK characters redrew it wrong (a character hidden, one shown
    twice), although the line sent was right. Drawn on a terminal emulator (pyte)."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "streamq", "chat", "--url", "http://127.0.0.1:9"],  # no front: nothing is sent
        cwd=str(ROOT),
        env=_env(LANG="C.UTF-8", LC_ALL="C.UTF-8"),
        dimensions=(24, 90),
        encoding="utf-8",
        timeout=30,
    )
    screen = pyte.Screen(90, 24)
    terminal = pyte.Stream(screen)

    def shown() -> str:
        """The screen's lines with text, joined, without spaces (a wide character's cell pair)."""
        return "".join(line.strip() for line in screen.display if line.strip()).replace(" ", "")

    def draw_until(done: Callable[[], bool], within: float = 20.0) -> None:
        """Feed what the program draws to the terminal until ``done`` (or ``within`` seconds: a
        busy machine draws late, so no fixed pause would do)."""
        deadline = time.monotonic() + within
        while not done() and time.monotonic() < deadline:
            with contextlib.suppress(pexpect.TIMEOUT):
                terminal.feed(child.read_nonblocking(4096, timeout=0.2))

    try:
        # Every byte through the emulator: no expect(), which keeps what it read past its match.
        draw_until(lambda: shown().endswith(PROMPT.replace(" ", "")))
        hanzi = "一二三四五六七八九十" * 3
        child.send(hanzi)
        draw_until(lambda: shown().endswith(hanzi))
        child.send("\x01X\x05\x7f\x7f\x7f")  # Ctrl-A, X, Ctrl-E, three backspaces
        typed = f"{PROMPT}X{hanzi[:-3]}".replace(" ", "")
        draw_until(lambda: shown().endswith(typed))
        assert shown().endswith(typed), screen.display
    finally:
        child.terminate(force=True)
