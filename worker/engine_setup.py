"""Building a worker's engine model from its backend: which kind, how many slots, how much KV."""

from __future__ import annotations

import logging
from typing import Any

from shared.settings import Settings
from worker.backend import ServedModel
from worker.engine import BatchModel

log = logging.getLogger("streamq.worker")

CPU_SLOTS = 8
SYNTHETIC_SLOTS = 100
MAX_AUTO_SLOTS = 64
DEFAULT_MAX_SEQ_LEN = 8192
GPU_KV_SHARE = 0.8  # of the memory left free after loading the model


def head_size(config: Any) -> int | None:
    """The model's attention head size, from its config (None when it does not say)."""
    head = getattr(config, "head_dim", None)
    if head:
        return int(head)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return int(hidden) // int(heads) if hidden and heads else None


def kv_bytes_per_token(config: Any, element_size: int) -> int:
    """Bytes one token takes in the KV cache (keys and values, every layer), from a model's
    config and its cache's element size (both engines size their cache with this)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return int(2 * config.num_hidden_layers * heads * (head_size(config) or 0) * element_size)


def choose_slots(settings: Settings, backend: ServedModel, per_token: int, max_len: int) -> int:
    if settings.slots is not None:
        return settings.slots
    if backend.device != "cuda":
        return CPU_SLOTS
    import torch

    free, _total = torch.cuda.mem_get_info()
    fit = int(free * GPU_KV_SHARE) // max(1, per_token * max_len)
    return max(1, min(MAX_AUTO_SLOTS, fit))


def build_model(settings: Settings, backend: ServedModel) -> tuple[BatchModel, int | None]:
    """The engine's model and the longest job it takes (prompt + answer tokens; None: no limit)."""
    from worker.causal_lm import CausalLMChat
    from worker.chatglm import ChatGLMChat
    from worker.serial_model import SerialModel
    from worker.synthetic import SyntheticBackend, SyntheticModel

    if isinstance(backend, SyntheticBackend):
        return SyntheticModel(backend, settings.slots or SYNTHETIC_SLOTS), None
    from worker.vllm_setup import VLLMServed

    if isinstance(backend, VLLMServed):
        from worker.vllm_setup import build_vllm_model

        return build_vllm_model(settings, backend)
    if isinstance(backend, ChatGLMChat):  # a model with its own stream_chat: one job per slot, unbatched
        serial = SerialModel(backend, settings.slots or CPU_SLOTS)
        warm_up(serial)
        return serial, backend.context_length
    if not isinstance(backend, CausalLMChat):
        raise TypeError(f"no engine for a {type(backend).__name__}")
    from worker.batch_lm import BatchedCausalLM

    max_len = settings.max_seq_len or min(backend.context_length or DEFAULT_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)
    if backend.context_length and max_len > backend.context_length:
        log.warning(
            "STREAMQ_MAX_SEQ_LEN (%d) is more than the model's context (%d tokens): a job holds %d",
            max_len,
            backend.context_length,
            backend.context_length,
        )
        max_len = backend.context_length
    per_token = kv_bytes_per_token(backend.model.config, next(backend.model.parameters()).element_size())
    slots = choose_slots(settings, backend, per_token, max_len)
    log.info(
        "engine: %d slot%s × %d tokens; KV cache at most %.0f MiB",
        slots,
        "" if slots == 1 else "s",
        max_len,
        slots * max_len * per_token / 2**20,
    )
    model = BatchedCausalLM(backend, slots, max_len, settings.prefill_chunk)
    warm_up(model)
    return model, max_len


def warm_up(model: BatchModel) -> None:
    """Run a two-token job through the engine's model once, so that the first user's job does not
    pay for its first-call allocations (the only warm-up on a worker's start-up path: loading
    the model does none). Where the engine offers them, the job asks for JSON and log
    probabilities: the tokenizer's tables they need (seconds for a large vocabulary) are built
    here, not while the first job that asks holds up every running one."""
    import time

    from shared.schemas import LOGPROBS, STRUCTURED_OUTPUT, ChatMessage, GenerationRequest
    from worker.engine import EngineJob

    request = GenerationRequest(
        messages=[ChatMessage(role="user", content="hi")],
        max_tokens=2,
        temperature=0.0,
        top_p=1.0,
        json_object=STRUCTURED_OUTPUT in model.features,
        logprobs=1 if LOGPROBS in model.features else None,
    )
    now = time.time()
    model.add(EngineJob("warm-up", request, now, now, time.monotonic() + 60))
    while model.ready_in() == 0:
        model.step()
