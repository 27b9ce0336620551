"""One in-process measurement in a fresh process, printed as one JSON line (its peak RSS included).

  python -m bench.cell prompts  --model DIR --tokens N --count K   prompts answered with N tokens
  python -m bench.cell generate --model DIR --tokens N --prompts JSON   row (a): model.generate, one
                                                                        request after another
  python -m bench.cell engine   --model DIR --tokens N --prompts JSON   row (b): streamq's engine,
                                                                        every request at t=0

Torch runs on ``--threads`` threads (default 2), as the worker does with STREAMQ_TORCH_THREADS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from typing import Any

from bench.measure import Cell, RequestTiming
from shared.schemas import ChatMessage, GenerationRequest

MAX_LEN = 4096  # what a worker gives each slot for this model (its context length)


def request(prompt: str, tokens: int) -> GenerationRequest:
    return GenerationRequest(
        messages=[ChatMessage(role="user", content=prompt)], max_tokens=tokens, temperature=0.0, top_p=1.0
    )


def load(model_dir: str, threads: int) -> Any:
    import torch

    from worker.model_loading import load_backend

    torch.set_num_threads(threads)
    return load_backend(model_dir, device="cpu", dtype="float32")


def pick_prompts(backend: Any, tokens: int, count: int) -> list[str]:
    """``count`` prompts whose greedy answer runs the full ``tokens`` (no early end of sequence).

    Candidates are checked together through the batching engine's model, whose greedy answers
    are those of ``backend.generate`` alone (tests/test_engine.py), in a fraction of the time."""
    from worker.batch_lm import BatchedCausalLM
    from worker.engine import EngineJob

    found: list[str] = []
    start = 0
    while len(found) < count and start < 40 * count:
        batch = [f"keep talking {i}" for i in range(start, start + max(8, 2 * (count - len(found))))]
        start += len(batch)
        model = BatchedCausalLM(backend, slots=len(batch), max_len=MAX_LEN)
        jobs = {}
        for prompt in batch:
            now = time.time()
            job = EngineJob(prompt, request(prompt, tokens), now, now, time.monotonic() + 3600)
            jobs[job] = prompt
            model.add(job)
        reasons: dict[str, str] = {}
        while model.ready_in() == 0:
            for out in model.step():
                if out.finish_reason is not None:
                    reasons[jobs[out.job]] = out.finish_reason
        found += [p for p in batch if reasons.get(p) == "length"]
    if len(found) < count:
        raise RuntimeError(f"only {len(found)} of {count} prompts run {tokens} tokens without ending early")
    return found[:count]


def run_generate(backend: Any, prompts: list[str], tokens: int) -> Cell:
    """Row (a): transformers' ``generate`` (greedy, KV cache), one request after another; each
    request's times count from t=0, when all clients arrived."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if not self.prompt_seen:  # generate hands the prompt first
                self.prompt_seen = True
                return
            self.times += [time.perf_counter()] * int(value.numel())

        def end(self) -> None:
            pass

    model = backend.model
    encoded = [backend.encode(request(p, tokens).messages) for p in prompts]

    def generate(ids: list[int], n: int, streamer: Any = None) -> None:
        inputs = torch.tensor([ids])
        model.generate(
            inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=n,
            do_sample=False,
            use_cache=True,
            streamer=streamer,
        )

    with torch.inference_mode():
        generate(encoded[0], 2)  # warm-up, as a worker warms up its engine
        cell = Cell()
        t0 = time.perf_counter()
        for ids in encoded:
            stamps = Stamps()
            generate(ids, tokens, stamps)
            cell.requests.append(
                RequestTiming(stamps.times[0] - t0, stamps.times[-1] - t0, len(stamps.times))
            )
    return cell


class Stamped:
    """The engine's sink (called in the engine's thread): per job, the time of every step that
    gave it a token, and its end; stops the engine once every job has ended."""

    def __init__(self) -> None:
        self.times: dict[Any, list[float]] = {}
        self.tokens: dict[Any, int] = {}
        self.ended: set[Any] = set()
        self.on_all_ended: tuple[int, Any] = (0, None)

    def put(self, outputs: list[Any]) -> None:
        now = time.perf_counter()
        for out in outputs:
            if out.completion_tokens > self.tokens.get(out.job, 0):
                self.times.setdefault(out.job, []).append(now)
                self.tokens[out.job] = out.completion_tokens
            if out.finish_reason is not None:
                self.ended.add(out.job)
        count, stop = self.on_all_ended
        if stop is not None and len(self.ended) == count:
            stop()


def run_engine(backend: Any, prompts: list[str], tokens: int) -> Cell:
    """Row (b): ``Engine(BatchedCausalLM(slots=c))`` in-process, all c jobs submitted at t=0."""
    from worker.batch_lm import BatchedCausalLM
    from worker.engine import Engine, EngineJob
    from worker.engine_setup import warm_up

    model = BatchedCausalLM(backend, slots=len(prompts), max_len=MAX_LEN, prefill_chunk=512)
    warm_up(model)
    sink = Stamped()
    engine = Engine(model, sink)
    now = time.time()
    jobs = [
        EngineJob(f"job-{i}", request(p, tokens), now, now, time.monotonic() + 3600)
        for i, p in enumerate(prompts)
    ]
    sink.on_all_ended = (len(jobs), engine.request_stop)
    t0 = time.perf_counter()
    for job in jobs:
        engine.submit(job)
    engine.run()  # here, in the thread that loaded the model, as a worker does
    cell = Cell()
    for job in jobs:
        times = sink.times.get(job, [])
        if times:
            cell.requests.append(RequestTiming(times[0] - t0, times[-1] - t0, sink.tokens[job]))
    return cell


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cell")
    parser.add_argument("what", choices=["prompts", "generate", "engine"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--prompts", help="JSON list of prompts (generate, engine)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    backend = load(args.model, args.threads)
    if args.what == "prompts":
        print(json.dumps(pick_prompts(backend, args.tokens, args.count)))
        return 0
    prompts = json.loads(args.prompts)
    run = run_generate if args.what == "generate" else run_engine
    cell = run(backend, prompts, args.tokens)
    cell.rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps(cell.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
