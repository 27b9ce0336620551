"""Starting vLLM as a worker's engine: what the worker serves (the tokenizer side; vLLM loads the
weights in its own engine), vLLM's engine arguments from streamq's settings (KV cache, context,
slots, CPU binding), and the engine itself with the slots its scheduler and KV cache hold.
``worker.vllm_engine`` drives it."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

from shared.logprobs import MAX_LOGPROBS
from shared.settings import Settings
from worker.chat_prompt import ChatPrompt, eos_ids_of
from worker.vllm_cpu import check_head_size, default_kv_cache_bytes, set_cpu_defaults
from worker.vllm_engine import VLLMModel

log = logging.getLogger("streamq.worker")

DEFAULT_MAX_MODEL_LEN = 8192
GiB = 2**30


class VLLMServed(ChatPrompt):
    """What a vLLM worker serves, as the worker's threads see it: the tokenizer side only (vLLM
    loads the weights in its own engine)."""

    def __init__(
        self, name_or_path: str, tokenizer: Any, name: str, device: str, dtype: str, eos_ids: set[int]
    ) -> None:
        self.name_or_path = name_or_path
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.dtype = dtype
        self.eos_ids = eos_ids
        self.model_context: int | None = None  # the model's own (max_position_embeddings)
        self.kv_bytes_per_token: int | None = None  # keys and values of every layer, in dtype
        self.kv_layout: tuple[int, int] | None = None  # (layers, key-value heads) they are of
        self.context_length: int | None = None  # set by the engine: vLLM's max_model_len


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def load_vllm_served(settings: Settings, served: str, device: str) -> VLLMServed:
    """The tokenizer, chat template and end-of-sequence ids of ``settings.model``, to serve on
    ``device`` (resolved: cpu or cuda)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from worker.engine_setup import kv_bytes_per_token
    from worker.model_loading import resolve_dtype

    if not vllm_installed():
        raise ValueError("the vLLM engine is not installed: run `make install-vllm` (see README)")
    model = settings.model or ""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"the vLLM engine runs on 'cpu' or 'cuda', not {device!r}")
    from vllm.platforms import current_platform

    if (device == "cpu") != current_platform.is_cpu():  # vLLM's build decides where it runs
        raise ValueError(
            f"this vLLM build runs on {current_platform.device_type or 'no device'}, not on {device!r}: "
            "the CPU needs vLLM's CPU build (vllm-cpu), a GPU the vllm package"
        )
    # On a GPU, vLLM chooses "auto" itself (read back once its engine is up): asking torch here
    # would start CUDA in this process before vLLM starts its own GPU workers.
    dtype = "auto" if device == "cuda" and settings.dtype == "auto" else resolve_dtype(settings.dtype, device)
    remote = settings.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=remote)
    config = AutoConfig.from_pretrained(model, trust_remote_code=remote)
    try:
        generation: Any = GenerationConfig.from_pretrained(model)
    except OSError:
        generation = None
    eos_ids = eos_ids_of(tokenizer, generation, config)
    served_model = VLLMServed(model, tokenizer, served, device, dtype, eos_ids)
    served_model.model_context = getattr(config, "max_position_embeddings", None)
    if device == "cpu":
        check_head_size(config)
    if getattr(config, "num_hidden_layers", None) and getattr(config, "num_attention_heads", None):
        served_model.kv_bytes_per_token = kv_bytes_per_token(config, 4 if dtype == "float32" else 2)
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        served_model.kv_layout = (int(config.num_hidden_layers), int(heads))
    return served_model


def per_gpu(per_token: int, layout: tuple[int, int] | None, tensor: int, pipeline: int) -> int:
    """A token's keys and values on one GPU of a model split ``tensor`` by ``pipeline`` ways (the
    KV budget is each GPU's): a pipeline stage holds its layers (some stages one more when they
    do not divide: the most is counted), a tensor shard its heads (a head on each when there are
    fewer heads than shards: vLLM copies them)."""
    if layout is None:
        return max(1, per_token // (tensor * pipeline))
    layers, heads = layout
    return per_token * math.ceil(layers / pipeline) * max(1, heads // tensor) // (layers * heads)


def check_kv_budget(settings: Settings, served: VLLMServed, max_len: int) -> None:
    """Refuse a KV cache too small for one job of ``max_len`` tokens, before vLLM starts (and
    fails far less clearly, in its engine process)."""
    per_token = served.kv_bytes_per_token
    if not settings.kv_cache_gib or not per_token:
        return
    per_token = per_gpu(
        per_token, served.kv_layout, settings.tensor_parallel_size, settings.pipeline_parallel_size
    )
    tokens = int(settings.kv_cache_gib * GiB) // per_token
    if tokens < max_len:
        need = math.ceil(max_len * per_token / GiB * 1000) / 1000  # rounded up: it must hold them
        raise ValueError(
            f"STREAMQ_KV_CACHE_GIB={settings.kv_cache_gib:g} holds about {tokens} tokens of this "
            f"model, and one job may take {max_len} (STREAMQ_MAX_SEQ_LEN): give the KV cache at "
            f"least {need:g} GiB, or lower STREAMQ_MAX_SEQ_LEN"
        )


def job_length(settings: Settings, served: VLLMServed) -> int:
    """Prompt + answer tokens of one job: vLLM's max_model_len."""
    context = min(served.model_context or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
    return settings.max_seq_len or context


def engine_args(settings: Settings, served: VLLMServed) -> Any:
    from vllm import EngineArgs
    from vllm.config import StructuredOutputsConfig

    kv_bytes = int(settings.kv_cache_gib * GiB) if settings.kv_cache_gib else None
    if kv_bytes is None and served.device == "cpu":
        kv_bytes = default_kv_cache_bytes(job_length(settings, served), served.kv_bytes_per_token)
    # vLLM's share of each GPU (its default unless set): at start it asks for that much free
    # memory, whatever the KV cache's size, so a GPU shared with other processes needs a lower one.
    shares = (
        {}
        if settings.gpu_memory_utilization is None
        else {"gpu_memory_utilization": settings.gpu_memory_utilization}
    )
    return EngineArgs(
        **shares,
        # On a CPU, vLLM runs the model in an executor process of its own (its OpenMP threads are
        # bound there); that process exits when the worker dies, however it dies.
        distributed_executor_backend="mp" if served.device == "cpu" else None,
        model=served.name_or_path,
        served_model_name=served.name,
        dtype=served.dtype,
        trust_remote_code=settings.trust_remote_code,
        max_model_len=job_length(settings, served),
        max_num_seqs=settings.slots,
        kv_cache_memory_bytes=kv_bytes,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        enforce_eager=settings.vllm_eager,
        # JSON answers without free whitespace (engine-wide in vLLM): a model cannot pad one out
        # until max_tokens, and the JSON is as valid.
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        # Log probabilities of the model's own distribution, before temperature, penalties, bias
        # or a grammar change it (vLLM's default, as OpenAI reports them), up to OpenAI's limit.
        logprobs_mode="raw_logprobs",
        max_logprobs=MAX_LOGPROBS,
        disable_log_stats=True,
    )


def kv_cache_tokens(engine: Any) -> int | None:
    cache = engine.vllm_config.cache_config
    blocks = getattr(cache, "num_gpu_blocks", None)
    return int(blocks) * int(cache.block_size) if blocks else None


def build_vllm_model(settings: Settings, served: VLLMServed) -> tuple[VLLMModel, int]:
    """Start vLLM's engine on the model; the slots are what its scheduler and KV cache hold."""
    check_kv_budget(settings, served, job_length(settings, served))
    if served.device == "cpu":
        set_cpu_defaults(settings)
    # vLLM's engine core (its scheduler) in this process, stepped by the worker's engine thread:
    # in a process of its own it would outlive a worker killed with SIGKILL, holding its memory.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLMEngine
    from vllm.usage.usage_lib import UsageContext

    from worker.vllm_json_mask import processor_for

    config = engine_args(settings, served).create_engine_config(UsageContext.ENGINE_CONTEXT)
    # With the grammar, the mask of the tokens no JSON answer may take (worker.vllm_json_mask), in
    # the interface of the model runner this configuration runs.
    config.model_config.logits_processors = [processor_for(config)]
    engine = LLMEngine.from_vllm_config(config, disable_log_stats=True)
    config = engine.vllm_config
    served.dtype = str(config.model_config.dtype).removeprefix("torch.")  # what "auto" became
    max_len = int(config.model_config.max_model_len)
    max_seqs = int(config.scheduler_config.max_num_seqs)
    kv_tokens = kv_cache_tokens(engine)
    # Every job the worker takes has room for its whole length in the KV cache, so vLLM never
    # preempts one: STREAMQ_SLOTS asks for more (vLLM then preempts and recomputes when short).
    fit = max(1, kv_tokens // max_len) if kv_tokens else max_seqs
    slots = settings.slots or min(max_seqs, fit)
    served.context_length = max_len
    log.info(
        "vLLM engine: %d slots (max_num_seqs %d, KV cache %s tokens), %d tokens per job",
        slots,
        max_seqs,
        kv_tokens if kv_tokens is not None else "?",
        max_len,
    )
    warm_logprobs(engine, served)
    return VLLMModel(engine, served, slots, max_len), max_len


def warm_logprobs(engine: Any, served: VLLMServed) -> None:
    """Run a request of the worker's own with log probabilities (its answer's and its prompt's)
    before the worker takes a job: vLLM compiles the ranks' count (``torch.compile``) at its first
    use, and that stalled the step of the first job that asked for them, and of every job beside
    it (2.4 s on 2 cores, 22 s under load, a ping before the first token)."""
    import time

    from vllm import SamplingParams, TokensPrompt

    started = time.monotonic()
    prompt = list(served.tokenizer.encode("warm up", add_special_tokens=False))[:4] or [0]
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, prompt_logprobs=1)
    engine.add_request("streamq-warm-up", TokensPrompt(prompt_token_ids=[*prompt, *prompt]), params)
    while engine.has_unfinished_requests():
        engine.step()
    log.info("vLLM engine: log probabilities warmed up in %.1f s", time.monotonic() - started)
