"""Loading a model once per worker: device and dtype choice, ``from_pretrained``, backend choice."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, cast, get_args

from shared.settings import Device, Dtype
from worker.backend import ChatBackend

log = logging.getLogger("streamq.worker")

DEVICES: tuple[str, ...] = get_args(Device)
DTYPES: tuple[str, ...] = get_args(Dtype)


# What a local model folder holds its tokenizer in (one of them, at least): fast tokenizers,
# their configuration, SentencePiece and BPE vocabularies (ChatGLM-6B: ice_text.model).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
    "vocab.txt", "ice_text.model",
)  # fmt: skip


def check_model_folder(name_or_path: str) -> None:
    """A local folder that holds no model, or no tokenizer, says so (transformers' own error for
    an empty folder names tokenizer libraries to install, and a folder without its tokenizer
    files loaded an empty one: every prompt was "no tokens"). A hub name is left to
    transformers."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return
    if not (folder / "config.json").is_file():
        raise ValueError(
            "the folder holds no model: it has no config.json (a transformers model folder holds "
            "its config.json, its weights and its tokenizer's files)"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"the folder has no tokenizer: none of {', '.join(TOKENIZER_FILES)}")


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype != "auto":
        return dtype
    if device == "cuda":  # bf16 where the GPU computes in it (Ampere on), not where torch emulates it
        return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    if device == "mps":
        return "float16"
    return "float32"


def default_served_name(name_or_path: str) -> str:
    """A local folder is served under its folder name, a hub model under its hub name."""
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else name_or_path


def configure_threads(device: str, threads: int | None) -> None:
    """On the CPU, one OpenMP team sized for this process (several workers share the cores)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(threads or max(1, os.cpu_count() or 1))


def load_backend(
    name_or_path: str,
    device: str = "auto",
    dtype: str = "auto",
    served_name: str | None = None,
    trust_remote_code: bool = False,
) -> ChatBackend:
    """Load tokenizer and model with the Auto classes and wrap them for the job runner."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from worker.causal_lm import CausalLMChat
    from worker.chatglm import ChatGLMChat, has_own_stream_chat

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = served_name or default_served_name(name_or_path)
    log.info("loading %s on %s (%s)", name_or_path, device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        )
    except ValueError:
        if not trust_remote_code:
            raise
        # ChatGLM-6B registers its model under AutoModel only.
        model = AutoModel.from_pretrained(name_or_path, dtype=getattr(torch, dtype), trust_remote_code=True)
    model = cast(Any, model).to(device).eval()
    backend: ChatBackend
    if has_own_stream_chat(model):
        backend = ChatGLMChat(model, tokenizer, name, device, dtype)
    else:
        backend = CausalLMChat(model, tokenizer, name, device, dtype)
    return backend
