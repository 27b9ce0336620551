"""Continuous batching for transformers causal LMs: one forward pass per step over all running jobs.

Jobs join between steps and leave as soon as they end; each keeps its own sampling settings,
seed (its draws: see ``sampling.JobDraws``), stop sequences and budget (see ``AnswerTokens``). A
joining job's prompt is computed (prefilled) in the same step as the others' next token, within
a budget of ``prefill_chunk`` prompt tokens per step: short prompts that arrive together are
prefilled together in one left-padded pass; a longer prompt is prefilled alone, a chunk per
step, so the jobs already running never wait for more than one chunk.

A job may also bring its own rules on the logits (logit bias, penalties, a JSON grammar: see
``logits_rules``) and ask for log probabilities of its answer's and its prompt's tokens (see
``batch_logprobs``). Only the rows of such jobs get that work; a batch of plain jobs takes its
tokens with one batched argmax (and each sampling job its own draw), as if no job asked.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.limits import InvalidJobRequest
from shared.logprobs import TokenLogprob
from shared.schemas import ENGINE_FEATURES, TOOLS
from worker.answer_tokens import AnswerTokens
from worker.batch_logprobs import answer_entries, prompt_entries
from worker.causal_lm import CausalLMChat
from worker.chat_prompt import PromptRenderer
from worker.engine import EngineJob, JobOutput, ended, resume
from worker.logits_rules import JobRules, apply_rules, logits_width
from worker.row_failures import RowFailed, dead_row, is_dead
from worker.sampling import JobDraws, SamplingParams
from worker.slot_cache import SlotCache, decode_mask, extend_mask, prefill_mask
from worker.token_logprobs import TokenTexts

log = logging.getLogger("streamq.worker")


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
    draws: JobDraws
    rules: JobRules | None = None  # its logit bias, penalties and grammar (None: it has none)
    logprobs: int | None = None  # alternatives per answer token (None: no log probabilities)
    prompt_k: int | None = None  # alternatives per prompt token, until its first token is out
    prompt_entries: list[TokenLogprob] = field(default_factory=list)  # so far, in prefill
    row: int = -1
    position: int = 0  # tokens of this job held in its cache row


class BatchedCausalLM:
    engine = "transformers"
    features: frozenset[str]  # all of ENGINE_FEATURES (tools when the chat template takes them)

    def __init__(self, backend: CausalLMChat, slots: int, max_len: int, prefill_chunk: int = 512) -> None:
        self.backend = backend
        self.slots = slots
        self.prefill_chunk = prefill_chunk
        self.cache = SlotCache(slots, max_len)
        self._model = backend.model
        self._device = backend.device
        self._dtype: torch.dtype = next(backend.model.parameters()).dtype
        self._windows = attention_windows(backend.model.config)
        self.features = ENGINE_FEATURES if backend.takes_tools() else ENGINE_FEATURES - {TOOLS}
        self._vocab = logits_width(backend.model)
        embeddings = backend.model.get_input_embeddings()
        self._input_vocab = int(getattr(embeddings, "num_embeddings", self._vocab))
        self.vocab_size = min(self._vocab, self._input_vocab)  # token ids it takes in prompts and biases
        self._grammars = backend.grammars
        self._texts = TokenTexts(backend.tokenizer, self._vocab)
        self._renderer = PromptRenderer(backend)
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: _Sequence | None = None  # a long prompt, a chunk per step; row len(active)
        self._active: list[_Sequence] = []  # running jobs; _active[i] holds cache row i
        self._held: dict[EngineJob, _Sequence] = {}

    # The engine's interface.

    def prepare(self, job: EngineJob) -> None:
        """Render the job's prompt and compile its grammar in the calling (job) thread; a schema
        xgrammar refuses is refused again, naming it, when the job joins."""
        job.prompt_ids, job.prompt_error = self._renderer.render(job.request)
        with contextlib.suppress(InvalidJobRequest):
            self._grammars.compiled(job.request)

    def add(self, job: EngineJob) -> None:
        request = job.request
        prompt = job.rendered_prompt()
        if prompt is None:
            prompt = self.backend.encode(request)
        self._check_prompt(prompt, "raw_prompt" if request.raw else "messages")
        answer = self.backend.answer(request, len(prompt), self.cache.max_len)
        params, draws = self.backend.sampling(request, job.job_id)
        job.prompt_tokens = len(prompt)
        resume(job, answer)  # continue an earlier run, if there was one
        rules = JobRules.of(request, prompt, job.resume_ids, self._grammars, self._device)
        sequence = _Sequence(job, prompt + job.resume_ids, answer, params, draws, rules, request.logprobs)
        if request.prompt_logprobs is not None and not job.resume_ids:  # else the earlier run sent them
            first = self._texts.entry(prompt[0], None, [])  # the first token: no logprob
            sequence.prompt_k, sequence.prompt_entries = request.prompt_logprobs, [first]
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

    def _check_prompt(self, prompt: list[int], param: str) -> None:
        if not prompt:
            raise InvalidJobRequest("the prompt has no tokens", param=param)
        bad = next((t for t in prompt if not 0 <= t < self._input_vocab), None)
        if bad is not None:
            raise InvalidJobRequest(
                f"token id {bad} is not in this model's vocabulary (0 to {self._input_vocab - 1})",
                param=param,
            )

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
        # Logits of every position a job that asks for its prompt's log probabilities needs (the
        # last ``keep`` of each row: its whole prompt); only the last one otherwise.
        keep = max((n for s, n in zip(batch, lengths, strict=True) if s.prompt_k is not None), default=1)
        self.cache.bind_prefill(rows, lengths, width)
        out = self._forward(
            torch.tensor(ids, device=self._device),
            torch.tensor(positions, device=self._device),
            lambda window: prefill_mask(pads, width, self._dtype, self._device, window),
            keep,
        )
        for i, (sequence, row) in enumerate(zip(batch, rows, strict=True)):
            sequence.row, sequence.position = row, len(sequence.prompt)
            self._active.append(sequence)
            if sequence.prompt_k is not None:  # position t predicts prompt token t + 1
                self._prompt_logprobs(sequence, out.logits[i, keep - lengths[i] : keep - 1], 1)
        return self._sample(batch, out.logits[:, -1])

    def _extend(self, sequence: _Sequence) -> list[JobOutput]:
        start = sequence.position
        count = min(self.prefill_chunk, len(sequence.prompt) - start)
        self.cache.bind_extend(sequence.row, start, count)
        out = self._forward(
            torch.tensor([sequence.prompt[start : start + count]], device=self._device),
            torch.arange(start, start + count, device=self._device)[None],
            lambda window: extend_mask(start, count, self._dtype, self._device, window),
            count if sequence.prompt_k is not None else 1,
        )
        if sequence.prompt_k is not None:
            self._prompt_logprobs(sequence, out.logits[0], start + 1)
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
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: Callable[[int | None], torch.Tensor],
        keep: int = 1,
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
            logits_to_keep=keep,
            **{self.backend.cache_argument: self.cache},
        )

    def _prompt_logprobs(self, sequence: _Sequence, logits: torch.Tensor, first: int) -> None:
        """Entries of the prompt's tokens from ``first`` on, ``logits[i]`` predicting token
        ``first + i`` (a chunk's last position may predict the answer's first token: not kept)."""
        assert sequence.prompt_k is not None
        targets = sequence.prompt[first : first + logits.shape[0]]
        entries = prompt_entries(self._texts, logits[: len(targets)], targets, sequence.prompt_k)
        sequence.prompt_entries += entries

    def _choose(self, sequences: list[_Sequence], logits: torch.Tensor) -> list[int | RowFailed]:
        """Each job's next token: greedy or sampled with its own settings, after its own rules; a
        row with no token to take fails its own job only (``RowFailed``), not the step's others."""
        best: list[int | RowFailed] = list(logits.argmax(dim=-1).tolist())
        changed: dict[int, torch.Tensor] = {}
        ruled = [i for i, s in enumerate(sequences) if s.rules is not None]
        if ruled:  # a float32 copy of those rows, changed by each job's rules
            block = logits[ruled].float()
            apply_rules(block, [r for i in ruled if (r := sequences[i].rules)])
            dead = is_dead(block)
            for j, token in enumerate(block.argmax(dim=-1).tolist()):
                i = ruled[j]
                if dead[j]:  # only then: which grammar, if any, left it no token
                    rules, request = sequences[i].rules, sequences[i].job.request
                    answered = sequences[i].answer.token_ids
                    start = self._texts.token_bytes(answered[0]) if answered else None
                    grammar = request.grammar_field(start) if rules and rules.matcher else None
                    token = dead_row(block[j], grammar, len(sequences[i].answer.token_ids))
                best[i] = token
                changed[i] = block[j]
        # A sampled draw depends on the job's seed and the token's index in its answer only, so a
        # continued job (its earlier tokens replayed into ``answer``) draws as the first run would.
        return [
            best[i]
            if s.params.greedy or isinstance(best[i], RowFailed)
            else self._drawn(s, changed.get(i, logits[i]))
            for i, s in enumerate(sequences)
        ]

    @staticmethod
    def _drawn(sequence: _Sequence, row: torch.Tensor) -> int | RowFailed:
        try:
            return sequence.draws.next_token(row, sequence.params, len(sequence.answer.token_ids))
        except RuntimeError as exc:  # e.g. scores that overflowed: torch.multinomial refuses them
            return RowFailed.of(exc)

    def _sample(self, sequences: list[_Sequence], logits: torch.Tensor) -> list[JobOutput]:
        """Each job's next token with its own settings; the text it adds; the jobs that ended."""
        tokens = self._choose(sequences, logits)
        taken = {i: token for i, token in enumerate(tokens) if isinstance(token, int)}
        asked = [i for i, s in enumerate(sequences) if s.logprobs is not None and i in taken]
        entries: dict[int, TokenLogprob] = {}
        if asked:  # from the raw logits, before any rule changed them
            ks = [sequences[i].logprobs or 0 for i in asked]
            found = answer_entries(self._texts, logits[asked], [taken[i] for i in asked], ks)
            entries = dict(zip(asked, found, strict=True))
        outputs = []
        finished = []
        for i, sequence in enumerate(sequences):
            token = tokens[i]
            job = sequence.job
            answer = sequence.answer
            before = len(answer.token_ids)
            failed = token if isinstance(token, RowFailed) else None
            if not isinstance(token, RowFailed):
                try:
                    text = answer.push(token)
                    if sequence.rules is not None and answer.finish_reason is None:
                        sequence.rules.accept(token)
                except Exception as exc:  # e.g. a token its grammar refuses
                    failed = RowFailed.of(exc)
            if failed is not None:  # this job's own failure: it ends, the others go on
                log.warning("job %s failed in a step, alone: %s", job.job_id, failed)
                outputs.append(ended(job, "error", failed.error_type, str(failed), failed.param))
                finished.append(sequence)
                continue
            job.completion_tokens = answer.completion_tokens
            new_ids = tuple(answer.token_ids[before:])
            prompt_logprobs = None
            if sequence.prompt_k is not None:  # sent once, with the job's first token
                prompt_logprobs = tuple(sequence.prompt_entries)
                sequence.prompt_k, sequence.prompt_entries = None, []
            outputs.append(
                JobOutput(
                    job,
                    text,
                    job.prompt_tokens,
                    job.completion_tokens,
                    answer.finish_reason,
                    token_ids=new_ids,
                    logprobs=(entries[i],) if i in entries else (),  # an end of sequence's too
                    prompt_logprobs=prompt_logprobs,
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
