"""Continuous batching for transformers causal LMs: one forward pass per step over all running jobs.

Jobs join between steps and leave as soon as they end; each keeps its own sampling settings,
seed, stop sequences and budget (see ``AnswerTokens``). A joining job's prompt is computed
(prefilled) in the same step as the others' next token, within a budget of ``prefill_chunk``
prompt tokens per step: short prompts that arrive together are prefilled together in one
left-padded pass; a longer prompt is prefilled alone, a chunk per step, so the jobs already
running never wait for more than one chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shared.limits import InvalidJobRequest
from worker.answer_tokens import AnswerTokens
from worker.causal_lm import CausalLMChat
from worker.engine import EngineJob, JobOutput
from worker.sampling import SamplingParams, sample_next
from worker.slot_cache import SlotCache, decode_mask, extend_mask, prefill_mask


def attention_windows(config: Any) -> dict[str, int | None]:
    """The model's kinds of attention layer and each one's sliding window (None: full)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        window = getattr(config, "sliding_window", None)
        return {kind: window if kind == "sliding_attention" else None for kind in sorted(set(layer_types))}
    uses_window = getattr(config, "use_sliding_window", True)
    return {"full_attention": getattr(config, "sliding_window", None) if uses_window else None}


@dataclass(eq=False)
class _Sequence:
    job: EngineJob
    prompt: list[int]
    answer: AnswerTokens
    params: SamplingParams
    generator: torch.Generator
    row: int = -1
    position: int = 0  # tokens of this job held in its cache row


class BatchedCausalLM:
    engine = "transformers"
    features: frozenset[str] = frozenset()  # no penalties, logit bias or structured output

    def __init__(self, backend: CausalLMChat, slots: int, max_len: int, prefill_chunk: int = 512) -> None:
        self.backend = backend
        self.slots = slots
        self.prefill_chunk = prefill_chunk
        self.cache = SlotCache(slots, max_len)
        self._model = backend.model
        self._device = backend.device
        self._dtype: torch.dtype = next(backend.model.parameters()).dtype
        self._windows = attention_windows(backend.model.config)
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: _Sequence | None = None  # a long prompt, a chunk per step; row len(active)
        self._active: list[_Sequence] = []  # running jobs; _active[i] holds cache row i
        self._held: dict[EngineJob, _Sequence] = {}

    # The engine's interface.

    def add(self, job: EngineJob) -> None:
        prompt = self.backend.encode(job.request)
        answer = self.backend.answer(job.request, len(prompt), self.cache.max_len)
        params, generator = self.backend.sampling(job.request)
        job.prompt_tokens = len(prompt)
        if job.resume_ids:  # continue an earlier run: its tokens are replayed, their text was sent
            for token in job.resume_ids:
                answer.push(token)
            job.completion_tokens = answer.completion_tokens
            if answer.finish_reason is not None:
                raise InvalidJobRequest("the job's earlier run had already ended its answer")
        sequence = _Sequence(job, prompt + job.resume_ids, answer, params, generator)
        self._waiting.append(sequence)
        self._held[job] = sequence

    @torch.inference_mode()
    def remove(self, job: EngineJob) -> None:
        sequence = self._held.pop(job, None)
        if sequence is None:
            return
        if sequence is self._prefilling:
            self._prefilling = None
        elif sequence in self._waiting:
            self._waiting.remove(sequence)
        elif 0 <= sequence.row < len(self._active) and self._active[sequence.row] is sequence:
            self._release(sequence)
        # else: taken for a prefill that failed before it got a row; nothing to free

    def ready_in(self) -> float | None:
        return 0.0 if self._held else None

    @torch.inference_mode()
    def step(self) -> list[JobOutput]:
        outputs = self._prefill()
        if self._active:
            outputs += self._decode()
        return outputs

    @property
    def running(self) -> int:
        return len(self._active)

    # Prefill: the prompt's keys and values into the job's row, and its first token.

    def _free_rows(self) -> int:
        return self.slots - len(self._active) - (1 if self._prefilling else 0)

    def _prefill(self) -> list[JobOutput]:
        if self._prefilling is not None:
            return self._extend(self._prefilling)
        batch: list[_Sequence] = []
        width = 0
        while self._waiting and len(batch) < self._free_rows():
            size = len(self._waiting[0].prompt)
            # The pass computes width × rows tokens (padding included): keep that in budget.
            if max(width, size) * (len(batch) + 1) > self.prefill_chunk:
                if not batch:  # too long for one step: prefill it alone, a chunk per step
                    self._prefilling = self._waiting.popleft()
                    self._prefilling.row = len(self._active)
                    return self._extend(self._prefilling)
                break
            batch.append(self._waiting.popleft())
            width = max(width, size)
        return self._prefill_batch(batch) if batch else []

    def _prefill_batch(self, batch: list[_Sequence]) -> list[JobOutput]:
        lengths = [len(s.prompt) for s in batch]
        width = max(lengths)
        pads = [width - n for n in lengths]
        rows = [len(self._active) + i for i in range(len(batch))]
        ids = [[0] * pad + s.prompt for s, pad in zip(batch, pads, strict=True)]
        positions = [[max(0, t - pad) for t in range(width)] for pad in pads]
        self.cache.bind_prefill(rows, lengths, width)
        out = self._forward(
            torch.tensor(ids, device=self._device),
            torch.tensor(positions, device=self._device),
            lambda window: prefill_mask(pads, width, self._dtype, self._device, window),
        )
        for sequence, row in zip(batch, rows, strict=True):
            sequence.row, sequence.position = row, len(sequence.prompt)
            self._active.append(sequence)
        return self._sample(batch, out.logits[:, -1])

    def _extend(self, sequence: _Sequence) -> list[JobOutput]:
        start = sequence.position
        count = min(self.prefill_chunk, len(sequence.prompt) - start)
        self.cache.bind_extend(sequence.row, start, count)
        out = self._forward(
            torch.tensor([sequence.prompt[start : start + count]], device=self._device),
            torch.arange(start, start + count, device=self._device)[None],
            lambda window: extend_mask(start, count, self._dtype, self._device, window),
        )
        sequence.position = start + count
        if sequence.position < len(sequence.prompt):
            return []
        self._prefilling = None
        self._active.append(sequence)
        return self._sample([sequence], out.logits[:, -1])

    # Decode: one token for every running job.

    def _decode(self) -> list[JobOutput]:
        running = list(self._active)
        inputs = torch.tensor([[s.answer.token_ids[-1]] for s in running], device=self._device)
        at = [s.position for s in running]
        positions = torch.tensor(at, device=self._device)
        span = max(at) + 1
        self.cache.bind_decode(len(running), positions, span)
        out = self._forward(
            inputs, positions[:, None], lambda window: decode_mask(positions, span, self._dtype, window)
        )
        for sequence in running:
            sequence.position += 1
        return self._sample(running, out.logits[:, -1])

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: Callable[[int | None], torch.Tensor]
    ) -> Any:
        # One kind of layer: a ready 4D mask, which every model takes as is. Several (e.g.
        # full and sliding-window layers): a mask per kind, which those models accept.
        if len(self._windows) == 1:
            masks: Any = mask(next(iter(self._windows.values())))
        else:
            masks = {kind: mask(window) for kind, window in self._windows.items()}
        return self._model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=masks,
            use_cache=True,
            logits_to_keep=1,
            **{self.backend.cache_argument: self.cache},
        )

    def _sample(self, sequences: list[_Sequence], logits: torch.Tensor) -> list[JobOutput]:
        """Each job's next token with its own settings; the text it adds; the jobs that ended."""
        best = logits.argmax(dim=-1).tolist()
        outputs = []
        finished = []
        for i, sequence in enumerate(sequences):
            params = sequence.params
            token = best[i] if params.greedy else sample_next(logits[i], params, sequence.generator)
            answer = sequence.answer
            before = len(answer.token_ids)
            text = answer.push(token)
            job = sequence.job
            job.completion_tokens = answer.completion_tokens
            new_ids = tuple(answer.token_ids[before:])
            outputs.append(
                JobOutput(
                    job,
                    text,
                    job.prompt_tokens,
                    job.completion_tokens,
                    answer.finish_reason,
                    token_ids=new_ids,
                )
            )
            if answer.finish_reason is not None:
                finished.append(sequence)
        for sequence in sorted(finished, key=lambda s: s.row, reverse=True):
            self._held.pop(sequence.job, None)
            self._release(sequence)
        return outputs

    def _release(self, sequence: _Sequence) -> None:
        """Free a running job's row, moving the last running job into it to keep rows packed."""
        last = self._active.pop()
        if last is not sequence:
            hole = sequence.row
            self.cache.move(last.row, hole, last.position)
            last.row = hole
            self._active[hole] = last
        if self._prefilling is not None and self._prefilling.row != len(self._active):
            target = len(self._active)
            self.cache.move(self._prefilling.row, target, self._prefilling.position)
            self._prefilling.row = target
