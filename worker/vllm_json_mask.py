"""The vLLM engine's mask of the tokens a JSON answer must never take: a vLLM logits processor.

xgrammar's rule for a string with a ``maxLength`` or ``minLength`` lets raw control characters
through (invalid JSON), and a special token decodes to nothing (the text would not be the JSON
the grammar checked). The transformers engine masks both kinds for every JSON answer
(``worker.logits_rules.not_json_ids``); this processor does the same inside vLLM's sampler.

It is a vLLM logits processor (``EngineArgs.logits_processors``), built once per engine where
vLLM runs the model, with the set of banned ids read from the model's tokenizer there; a
request asks for it with ``extra_args={JSON_MASK: True}``. Each step it sets those rows' banned
logits to -inf, in place. A request's own stop tokens (its end of sequence) stay allowed, or its
answer could not end. vLLM has two model runners, each with its own interface for such a
processor: ``JsonAnswerMask`` for the first (vLLM's choice on CPUs, and where the second cannot
run), ``JsonAnswerMaskV2`` for Model Runner V2 (its default on GPUs with Triton);
``processor_for`` names the one the engine's configuration runs.

vLLM's ``allowed_token_ids`` did the same per request, at a price that grows with the
vocabulary: the list of every other id (about 150,000 on Qwen's vocabulary) travels with each
request, and vLLM fills a vocabulary-wide mask row from it when the request joins the batch,
in the engine's step (bench/json_mask.py measures both); Model Runner V2 takes at most 1,024
allowed ids, so it refused every JSON request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from worker.logits_rules import not_json_ids

if TYPE_CHECKING:
    from vllm.config import VllmConfig

JSON_MASK = "streamq_json_mask"  # the SamplingParams.extra_args key that asks for the mask
PROCESSOR = "worker.vllm_json_mask:JsonAnswerMask"  # their names for EngineArgs.logits_processors
PROCESSOR_V2 = "worker.vllm_json_mask:JsonAnswerMaskV2"


def processor_for(vllm_config: Any) -> str:
    """The mask's class for the model runner this engine configuration runs."""
    return PROCESSOR_V2 if vllm_config.use_v2_model_runner else PROCESSOR


def _asks(params: Any) -> bool:
    return bool((params.extra_args or {}).get(JSON_MASK))


def banned_ids(model_config: Any) -> set[int]:
    """The ids no JSON answer may take on this model (its stop tokens included: each request
    allows its own): special tokens and tokens with a raw control character, from the model's
    tokenizer and xgrammar's decoded vocabulary, as vLLM's own xgrammar backend reads it."""
    import xgrammar
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_config.tokenizer,
        revision=model_config.tokenizer_revision,
        trust_remote_code=model_config.trust_remote_code,
    )
    vocab_size = int(model_config.get_vocab_size())
    vocabulary = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size).decoded_vocab
    return not_json_ids(tokenizer, vocabulary, set())


class JsonAnswerMask(LogitsProcessor):
    """Sets the banned ids' logits to -inf in the rows of the requests that ask for it."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self._device = device
        self._banned = frozenset(banned_ids(vllm_config.model_config))
        self._by_stops: dict[frozenset[int], torch.Tensor] = {}  # banned ids less a set of stops
        # Batch row -> (the ids banned there,): in a tuple, which vLLM's helper tests for truth.
        self._rows: dict[int, tuple[torch.Tensor]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it changes what greedy decoding picks

    def _banned_for(self, params: Any, _prompt: Any, _output: Any) -> tuple[torch.Tensor] | None:
        if not _asks(params):
            return None
        stops = frozenset(params.all_stop_token_ids)
        banned = self._by_stops.get(stops)
        if banned is None:
            ids = sorted(self._banned - stops)
            banned = torch.tensor(ids, dtype=torch.long, device=self._device)
            self._by_stops[stops] = banned
        return (banned,)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._banned_for)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (banned,) in self._rows.items():
            if banned.numel():
                logits[row].index_fill_(0, banned, float("-inf"))
        return logits


class JsonAnswerMaskV2(V2LogitsProcessor):
    """The same mask for Model Runner V2, whose rows are reordered every step: each request slot
    that asks for it has its banned ids as a vocabulary-wide row (one per set of stop tokens),
    and each step fills the rows of those slots, on the device, with no wait for the host."""

    def __init__(self, vllm_config: VllmConfig, req_states: Any) -> None:
        self._device = req_states.device
        self._vocab = int(req_states.vocab_size)
        self._banned = frozenset(banned_ids(vllm_config.model_config))
        self._sets: dict[frozenset[int], int] = {}  # stop tokens -> the index of its banned row
        self._rows: list[torch.Tensor] = []  # [vocab] bool, True where banned
        self._set_of_slot = [-1] * int(req_states.max_num_reqs)  # -1: no mask
        self._slot_sets: torch.Tensor | None = None  # the list above, on the device
        self._dirty = True

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        asked = _asks(sampling_params)
        index = self._set_index(frozenset(sampling_params.all_stop_token_ids)) if asked else -1
        if self._set_of_slot[req_idx] != index:
            self._set_of_slot[req_idx] = index
            self._dirty = True
        return asked

    def _set_index(self, stops: frozenset[int]) -> int:
        index = self._sets.get(stops)
        if index is None:
            row = torch.zeros(self._vocab, dtype=torch.bool)
            row[[i for i in self._banned - stops if i < self._vocab]] = True
            self._rows.append(row.to(self._device))
            index = self._sets[stops] = len(self._rows) - 1
        return index

    def apply_staged_writes(self) -> None:
        if self._dirty:
            self._slot_sets = torch.tensor(self._set_of_slot, dtype=torch.long).to(self._device)
            self._dirty = False

    def apply(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
        if self._slot_sets is None or not any(
            self._set_of_slot[slot] >= 0 for slot in ctx.idx_mapping_np.tolist()
        ):
            return logits
        row_sets = self._slot_sets[ctx.expanded_idx_mapping]  # each logits row's set, or -1
        for index, banned in enumerate(self._rows):
            rows = row_sets == index
            logits.masked_fill_(rows.unsqueeze(1) & banned.unsqueeze(0), float("-inf"))
        return logits
