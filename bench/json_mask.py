"""What a JSON answer costs vLLM's engine: ``python -m bench --only json-mask``.

A JSON answer on the vLLM engine may not take special tokens or raw control characters
(worker/vllm_json_mask.py). Two ways to say so to vLLM, on one engine in one run:

- *allowed_token_ids* (baseline): vLLM's per-request list of every token id the request may take,
  which the engine worker turns into a vocabulary-wide mask row when the request joins its batch;
- *mask processor* (streamq's): a logits processor built once per engine, asked for by a flag.

The engine is streamq's (``worker.vllm_setup``: in process, eager, fp32, 16 slots) on the tiny
model (head_dim 64) with its vocabulary padded to Qwen2.5's 151,936 ids, where the list of
allowed ids is about as long as on a real Qwen model; the model is small so that the step
measures what the requests cost, not the model. Rounds of 8 requests at once (the same JSON
schema, 40 tokens, sampled), and plain requests (no grammar) as the floor: the time of
``add_request``, of the first step (the 8 join the batch) and the median of the later steps.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VOCAB = 151_936  # Qwen2.5's vocabulary, padding included
AT_ONCE = 8
ROUNDS = 5
KINDS = ("plain", "allowed_token_ids", "mask processor")
SCHEMA = '{"type":"object","properties":{"a":{"type":"string","maxLength":20}},"required":["a"]}'


def _model(workdir: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from worker.tiny_model import make_tiny_model

    out = make_tiny_model(workdir / "json-mask-model", "tiny-hd64")
    model = AutoModelForCausalLM.from_pretrained(out)
    model.resize_token_embeddings(VOCAB)
    model.save_pretrained(out)
    return out


def _measure(model_dir: Path) -> dict[str, dict[str, list[float]]]:
    from vllm import SamplingParams, TokensPrompt
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    from shared.settings import Settings
    from worker.vllm_json_mask import JSON_MASK, banned_ids
    from worker.vllm_setup import build_vllm_model, load_vllm_served

    settings = Settings(
        model=str(model_dir), engine="vllm", dtype="float32", vllm_eager=True, kv_cache_gib=0.25,
        max_seq_len=512, slots=16,
    )  # fmt: skip
    served = load_vllm_served(settings, "json-mask", "cpu")
    engine = build_vllm_model(settings, served)[0].vllm
    banned = banned_ids(engine.vllm_config.model_config)[0][False] - served.eos_ids
    allowed = [token for token in range(VOCAB) if token not in banned]
    prompt = served.tokenizer("Answer in JSON")["input_ids"]
    count = 0

    def add(kind: str) -> float:
        nonlocal count
        count += 1
        extra: dict[str, Any] = {}
        if kind != "plain":
            extra["structured_outputs"] = StructuredOutputsParams(json=SCHEMA)
        if kind == "allowed_token_ids":
            extra["allowed_token_ids"] = allowed
        elif kind == "mask processor":
            extra["extra_args"] = {JSON_MASK: True}
        params = SamplingParams(
            max_tokens=40, temperature=1.0, seed=count, stop_token_ids=sorted(served.eos_ids),
            detokenize=False, output_kind=RequestOutputKind.DELTA, **extra,
        )  # fmt: skip
        start = time.perf_counter()
        engine.add_request(f"r{count}", TokensPrompt(prompt_token_ids=prompt), params)
        return time.perf_counter() - start

    def step() -> float:
        start = time.perf_counter()
        engine.step()
        return time.perf_counter() - start

    for kind in KINDS:  # warm-up: the grammar compiled, the mask's tensors made
        add(kind)
        while engine.has_unfinished_requests():
            engine.step()
    found: dict[str, dict[str, list[float]]] = {k: {"add": [], "first": [], "later": []} for k in KINDS}
    for _ in range(ROUNDS):
        for kind in KINDS:  # in turns, so the machine's drift falls on all alike
            adds = [add(kind) for _ in range(AT_ONCE)]
            first = step()
            later = []
            while engine.has_unfinished_requests():
                later.append(step())
            found[kind]["add"].append(statistics.mean(adds))
            found[kind]["first"].append(first)
            found[kind]["later"].append(statistics.median(later))
    return found


def run_json_mask(workdir: Path) -> None:
    """Runs the measurement in a process of its own (vLLM's engine and executor die with it)."""
    model = _model(workdir)
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, "-m", "bench.json_mask", str(model)], env=env, check=True)


def _print(found: dict[str, dict[str, list[float]]]) -> None:
    print(
        f"\nJSON answers on the vLLM engine — {platform.platform()}, {os.cpu_count()} cores\n"
        "command: python -m bench --only json-mask\n"
        f"streamq's vLLM engine in process (eager, fp32, CPU), tiny model with a {VOCAB:,}-id vocabulary; "
        f"{ROUNDS} rounds of {AT_ONCE} requests at once (40 tokens, sampled); medians over the rounds"
    )
    columns = ("add_request ms", "first step ms", "later step ms", "first ÷ plain")
    print(f"{'requests':<22}{columns[0]:>16}" + "".join(f"{c:>15}" for c in columns[1:]))
    plain = statistics.median(found["plain"]["first"])
    for kind in KINDS:
        add, first, later = (statistics.median(found[kind][k]) * 1e3 for k in ("add", "first", "later"))
        print(f"{kind:<22}{add:>16.2f}{first:>15.1f}{later:>15.2f}{first / (plain * 1e3):>14.1f}x")
    print("first step: the step in which the 8 requests join the batch (their prompts run)")


if __name__ == "__main__":  # the measurement's own process (vLLM's executor is spawned)
    _print(_measure(Path(sys.argv[1])))
