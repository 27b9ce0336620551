"""The vLLM engine's mask of the tokens a JSON answer must never take: a vLLM logits processor.

xgrammar's rule for a string with a ``maxLength`` or ``minLength`` lets raw control characters
through (invalid JSON), and a special token decodes to nothing (the text would not be the JSON
the grammar checked). The transformers engine masks both kinds for every JSON answer
(``worker.logits_rules.not_json_ids``); this processor does the same inside vLLM's sampler.

It also keeps a surrogate out across two tokens (``worker.surrogate_bytes``): after a token that
ends with the byte ED, no token that begins with A0-BF, as the transformers engine does.

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

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from worker.logits_rules import not_json_ids
from worker.surrogate_bytes import SurrogateGuard

if TYPE_CHECKING:
    from vllm.config import VllmConfig

JSON_MASK = "streamq_json_mask"  # the SamplingParams.extra_args key that asks for the mask
CALLS = "calls"  # its value for text with strict calls (True: a JSON answer)
PROCESSOR = "worker.vllm_json_mask:JsonAnswerMask"  # their names for EngineArgs.logits_processors
PROCESSOR_V2 = "worker.vllm_json_mask:JsonAnswerMaskV2"
T = TypeVar("T")


def processor_for(vllm_config: Any) -> str:
    """The mask's class for the model runner this engine configuration runs."""
    return PROCESSOR_V2 if vllm_config.use_v2_model_runner else PROCESSOR


def _asks(params: Any) -> bool:
    return bool((params.extra_args or {}).get(JSON_MASK))


def _blanks(params: Any) -> bool:
    """Whether the request's text has strict calls in it (``JSON_MASK: CALLS``): tabs, newlines and
    carriage returns stay allowed, as the calls' format needs them."""
    return (params.extra_args or {}).get(JSON_MASK) == CALLS


def banned_ids(model_config: Any) -> tuple[dict[bool, frozenset[int]], SurrogateGuard]:
    """The ids no JSON answer may take on this model (its stop tokens included: each request
    allows its own): special tokens and tokens with a raw control character, from the model's
    tokenizer and xgrammar's decoded vocabulary, as vLLM's own xgrammar backend reads it; under
    True, those of text with strict calls in it (tab, newline and carriage return allowed). And
    the vocabulary's tokens that leave a surrogate's lead byte open, and those that may not follow."""
    import xgrammar
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_config.tokenizer,
        revision=model_config.tokenizer_revision,
        trust_remote_code=model_config.trust_remote_code,
    )
    vocab_size = int(model_config.get_vocab_size())
    vocabulary = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size).decoded_vocab
    banned = {
        blanks: frozenset(not_json_ids(tokenizer, vocabulary, set(), blanks)) for blanks in (False, True)
    }
    return banned, SurrogateGuard(vocabulary)


class _PerStopSet(Generic[T]):
    """The engine's banned ids less a request's own stop tokens, made into what a processor keeps
    (``make``), once per set of stop tokens (every streamq request has the same one)."""

    def __init__(self, banned: dict[bool, frozenset[int]], make: Callable[[list[int]], T]) -> None:
        self._banned = banned  # blanks allowed? -> the ids banned
        self._make = make
        self._made: dict[tuple[bool, frozenset[int]], T] = {}

    def of(self, params: Any) -> T:
        blanks, stops = _blanks(params), frozenset(params.all_stop_token_ids)
        if (blanks, stops) not in self._made:
            self._made[blanks, stops] = self._make(sorted(self._banned[blanks] - stops))
        return self._made[blanks, stops]


def _last_token(prompt: list[int] | None, output: list[int]) -> int | None:
    """The token before the one to sample: the answer's last, else the prompt's (a continued
    answer's last); None where not known yet (vLLM's placeholder, -1, with async scheduling)."""
    last = output[-1] if output else (prompt[-1] if prompt else None)
    return None if last is None or last < 0 else last


class JsonAnswerMask(LogitsProcessor):  # type: ignore[misc]  # vLLM's class: untyped here
    """Sets the banned ids' logits to -inf in the rows of the requests that ask for it."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        banned, self._guard = banned_ids(vllm_config.model_config)
        self._banned = _PerStopSet(banned, lambda ids: torch.tensor(ids, dtype=torch.long, device=device))
        self._after_lead = torch.tensor(sorted(self._guard.after_lead), dtype=torch.long, device=device)
        # Batch row -> the ids banned there, and the request's prompt and live output ids.
        self._rows: dict[int, tuple[torch.Tensor, list[int] | None, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it changes what greedy decoding picks

    def _banned_for(
        self, params: Any, prompt: list[int] | None, output: list[int]
    ) -> tuple[torch.Tensor, list[int] | None, list[int]] | None:
        return (self._banned.of(params), prompt, output) if _asks(params) else None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._banned_for)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (banned, prompt, output) in self._rows.items():
            if banned.numel():
                logits[row].index_fill_(0, banned, float("-inf"))
            if self._guard.leaves_lead(_last_token(prompt, output)):
                logits[row].index_fill_(0, self._after_lead, float("-inf"))
        return logits


class JsonAnswerMaskV2(V2LogitsProcessor):  # type: ignore[misc]  # vLLM's class: untyped here
    """The same mask for Model Runner V2, whose rows are reordered every step: each request slot
    that asks for it has its banned ids as a vocabulary-wide row (one per set of stop tokens),
    and each step fills the rows of those slots, on the device, with no wait for the host."""

    def __init__(self, vllm_config: VllmConfig, req_states: Any) -> None:
        self._device = req_states.device
        self._vocab = int(req_states.vocab_size)
        self._rows: list[torch.Tensor] = []  # [vocab] bool, True where banned
        banned, guard = banned_ids(vllm_config.model_config)
        self._banned = _PerStopSet(banned, self._new_row)  # -> its index in _rows
        # No surrogate across two tokens: the ids that end with ED, and those that may not follow
        # (a few thousand ids: only their columns are touched).
        self._lead_ends = self._vocab_row(guard.lead_ends)
        after_lead = sorted(i for i in guard.after_lead if i < self._vocab)
        self._after_lead = torch.tensor(after_lead, dtype=torch.long).to(self._device)
        self._set_of_slot = np.full(int(req_states.max_num_reqs), -1, dtype=np.int64)  # -1: no mask
        self._slot_sets: torch.Tensor | None = None  # the array above, on the device
        self._dirty = True

    def _vocab_row(self, ids: Iterable[int]) -> torch.Tensor:
        row = torch.zeros(self._vocab, dtype=torch.bool)
        row[[i for i in ids if i < self._vocab]] = True
        return row.to(self._device)

    def _new_row(self, ids: list[int]) -> int:
        self._rows.append(self._vocab_row(ids))
        return len(self._rows) - 1

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        asked = _asks(sampling_params)
        index = self._banned.of(sampling_params) if asked else -1
        if self._set_of_slot[req_idx] != index:
            self._set_of_slot[req_idx] = index
            self._dirty = True
        return asked

    def apply_staged_writes(self) -> None:
        if self._dirty:
            self._slot_sets = torch.from_numpy(self._set_of_slot.copy()).to(self._device)
            self._dirty = False

    def apply(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
        used = self._set_of_slot[ctx.idx_mapping_np]  # on the host: each slot's set, or -1
        if self._slot_sets is None or not (used >= 0).any():
            return logits
        row_sets = self._slot_sets[ctx.expanded_idx_mapping]  # each logits row's set, or -1
        for index in sorted(set(used[used >= 0].tolist())):  # only the sets this step's rows have
            rows = row_sets == index
            logits.masked_fill_(rows.unsqueeze(1) & self._rows[index].unsqueeze(0), float("-inf"))
        # Each row's input token is the one before the token it samples (the prompt's last at a
        # prefill: a continued answer's last).
        previous = ctx.input_ids.long().clamp(0, self._vocab - 1)
        lead_open = (row_sets >= 0) & self._lead_ends[previous]
        if self._after_lead.numel():
            columns = logits[:, self._after_lead]
            logits[:, self._after_lead] = columns.masked_fill(lead_open.unsqueeze(1), float("-inf"))
        return logits
