"""The synthetic backend (load tests without a GPU): each job's tokens come at its rate, the
first at once, and jobs running together share the engine's steps, as a batching engine's do."""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from shared.schemas import ChatMessage, GenerationRequest
from worker.engine import Engine, EngineJob, JobOutput
from worker.synthetic import SyntheticBackend, SyntheticModel

RATE = 100.0  # tokens per second, per job
TOKENS = 20
JOBS = 50


class _Sink:
    def __init__(self) -> None:
        self.received: dict[str, list[tuple[float, JobOutput]]] = defaultdict(list)
        self.ends = 0
        self.all_ended = threading.Event()

    def put(self, outputs: list[JobOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            self.received[output.job.job_id].append((now, output))
            if output.finish_reason:
                self.ends += 1
                if self.ends == JOBS:
                    self.all_ended.set()


def test_tokens_come_at_the_jobs_rate_and_jobs_share_steps() -> None:
    sink = _Sink()
    engine = Engine(SyntheticModel(SyntheticBackend("synth", RATE), JOBS), sink)
    engine.start()
    try:
        request = GenerationRequest(prompt="hi", max_tokens=TOKENS, temperature=0, top_p=1)
        submitted = {}
        for i in range(JOBS):
            now = time.time()
            submitted[f"job-{i}"] = time.monotonic()
            engine.submit(EngineJob(f"job-{i}", request, now, now, time.monotonic() + 60))
            time.sleep(1 / RATE / JOBS)  # arrivals spread over a token's time, as clients come
        assert sink.all_ended.wait(30)
    finally:
        engine.stop()
    for job_id, received in sink.received.items():
        counts = [o.completion_tokens for _t, o in received]
        assert counts == list(range(1, TOKENS + 1)), job_id  # one token per output, none lost
        assert received[-1][1].finish_reason == "length"
        first, last = received[0][0], received[-1][0]
        assert first - submitted[job_id] < 1.0  # the first at once (not after a token's time)
        # Never faster than the rate: token n is due (n - 1) / RATE after the first.
        assert last - first >= (TOKENS - 1) / RATE - 0.002, job_id
    # Jobs that run together get their tokens in shared steps, not one step per token (their
    # arrivals, spread over a token's time, gave each job its own moment for every token).
    assert engine.steps < JOBS * TOKENS / 2, engine.steps


def test_a_cancel_stops_a_slow_job_without_waiting_for_its_next_token() -> None:
    ended = threading.Event()
    reasons: list[str | None] = []

    class Sink:
        def put(self, outputs: list[JobOutput]) -> None:
            for output in outputs:
                if output.finish_reason:
                    reasons.append(output.finish_reason)
                    ended.set()

    engine = Engine(SyntheticModel(SyntheticBackend("synth", 0.1), 1), Sink())  # a token each 10 s
    engine.start()
    try:
        now = time.time()
        request = GenerationRequest(prompt="hi", max_tokens=5, temperature=0, top_p=1)
        job = EngineJob("slow", request, now, now, time.monotonic() + 60)
        engine.submit(job)
        time.sleep(0.3)  # its first token came at once; the next is 10 s away
        asked = time.monotonic()
        job.cancel.set()
        assert ended.wait(5)
        assert reasons == ["canceled"]
        assert time.monotonic() - asked < 0.5  # was up to a second: the engine's longest wait
    finally:
        engine.stop()


def test_max_length_bounds_the_prompt_and_the_answer_together() -> None:
    """POST / sends max_length 2048 by default: the answer is what is left beside the prompt (it
    went on to STREAMQ_MAX_TOKENS_LIMIT tokens, 4,096 here), and none left is the model's 400."""
    outputs: dict[str, list[JobOutput]] = defaultdict(list)
    done = threading.Event()

    class Sink:
        def put(self, batch: list[JobOutput]) -> None:
            for output in batch:
                outputs[output.job.job_id].append(output)
            if sum(1 for o in outputs.values() if o[-1].finish_reason) == 2:
                done.set()

    backend = SyntheticBackend("synth", 1000.0)
    engine = Engine(SyntheticModel(backend, 2), Sink())
    engine.start()
    try:
        now = time.time()
        for job_id, max_length in (("fits", 8), ("full", 6)):
            request = GenerationRequest(
                messages=[ChatMessage(role="user", content="two words")],
                max_length=max_length,
                max_tokens=4096,
                temperature=0,
                top_p=1,
            )
            assert backend.prompt_tokens(request) == 6  # a word per token, 4 for the message
            engine.submit(EngineJob(job_id, request, now, now, time.monotonic() + 60))
        assert done.wait(10)
    finally:
        engine.stop()
    fits, full = outputs["fits"][-1], outputs["full"][-1]
    assert (fits.finish_reason, fits.completion_tokens, len(outputs["fits"])) == ("length", 2, 2)
    assert (full.finish_reason, full.error_param) == ("error", "max_length")
    assert full.error_message == "max_length (6) must be greater than the prompt's length (6 tokens)"
