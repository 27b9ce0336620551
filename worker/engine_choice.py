"""Which engine a worker runs its model on: ``STREAMQ_ENGINE`` / ``--engine``.

- ``transformers``: streamq's own continuous-batching engine over a transformers model (and
  ChatGLM-style models that bring their own ``stream_chat``, one job per slot).
- ``vllm``: vLLM's engine in the worker process (``make install-vllm``).
- ``auto`` (the default): vLLM where it is the clear win, on a CUDA device with vLLM installed and
  a model architecture vLLM serves; else transformers. On a CPU, auto keeps transformers: vLLM
  is faster there on models of 0.5B parameters and up (2.7x in fp32), but it starts in minutes
  rather than seconds, holds a preallocated KV cache (GBs) and is slower on very small models,
  so it is asked for by name. A model with its own code (``trust_remote_code``) stays on
  transformers unless vLLM is asked for, since its own ``stream_chat`` may be what it relies on.
"""

from __future__ import annotations

import logging
from typing import Literal

from shared.settings import Settings

log = logging.getLogger("streamq.worker")

EngineName = Literal["transformers", "vllm"]


def vllm_serves(model: str, trust_remote_code: bool) -> bool:
    """Whether vLLM has an implementation of the model's architecture."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    supported = set(ModelRegistry.get_supported_archs())
    return bool(architectures) and all(a in supported for a in architectures)


def choose_engine(settings: Settings, device: str) -> EngineName:
    from worker.vllm_setup import vllm_installed

    if settings.engine != "auto":
        return settings.engine
    if device != "cuda" or settings.trust_remote_code or not vllm_installed():
        return "transformers"
    try:
        serves = vllm_serves(settings.model or "", settings.trust_remote_code)
    except Exception as exc:  # vLLM present but broken: the transformers engine still serves
        log.warning("vLLM is installed but could not be used (%s); using the transformers engine", exc)
        return "transformers"
    return "vllm" if serves else "transformers"
