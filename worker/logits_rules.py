"""A job's own rules on the logits of its next token: logit bias, penalties and a JSON grammar.

The batching engine applies them, row by row, only to the jobs that have any (a batch of plain
jobs never comes here), in this order: ``logit_bias`` is added; the repetition penalty (over
the prompt and the answer: a positive logit is divided by it, a negative one multiplied, as HF
and vLLM do), then OpenAI's frequency and presence penalties (over the answer's tokens so far:
``frequency * count + presence * [count > 0]`` is subtracted); then the grammar's mask, which
leaves only the tokens that keep the answer valid JSON. Temperature, top-k and top-p come after.

Structured output uses xgrammar, as vLLM does: a model's tokenizer table is built once, each
schema is compiled once (a small LRU keyed by the schema's compact JSON), and each job has
its own ``GrammarMatcher``. JSON comes without free whitespace and with vLLM's separators
(``{"a":1,"b":2}``; xgrammar 0.2.8 keeps ``, `` in arrays and open objects), exactly as vLLM's
engine writes it (``disable_any_whitespace``): a model
cannot pad an answer with blanks until its budget runs out, both engines write the same text, and
a job a vLLM worker began (then died) is continued here through the same grammar.
Once the JSON is complete the grammar allows only end of sequence, so the answer ends "stop".
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

import torch

from shared.limits import InvalidJobRequest
from shared.schemas import LOGIT_BIAS, PENALTIES, STRICT_CALLS, STRUCTURED_OUTPUT, GenerationRequest
from worker.engine import CannotContinue
from worker.surrogate_bytes import SurrogateGuard, has_surrogate

JSON_SEPARATORS = (",", ":")  # as vLLM's xgrammar backend with disable_any_whitespace
TAG = "tag:"  # a structural tag's key in the cache (a JSON schema's key starts with '{')
RULED = {PENALTIES, LOGIT_BIAS, STRUCTURED_OUTPUT, STRICT_CALLS}  # the features that change the logits
GRAMMAR_CACHE = 32  # compiled grammars kept per model
ANY_OBJECT = '{"type":"object"}'  # json_object: any JSON object (not an array, not a bare value)


def logits_width(model: Any) -> int:
    """The number of logits a model gives per position (its vocabulary, padding included)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(model.config.vocab_size)


def special_ids(tokenizer: Any) -> set[int]:
    """The tokenizer's special tokens (decoding skips them, so a grammar must not pick them)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def not_json_ids(
    tokenizer: Any, vocabulary: list[bytes], stop_ids: set[int], blanks: bool = False
) -> set[int]:
    """The tokens a JSON answer must never take, whatever its grammar allows (both engines rule
    them out): the tokenizer's special tokens but its ends of sequence (decoding skips them, so
    the text would not be the JSON the grammar checked), and tokens with a control character:
    JSON without free whitespace has none outside its strings, and a raw one inside a string is
    invalid JSON, which xgrammar 0.2.8's rule for a string with a ``maxLength`` or ``minLength``
    still lets through; and tokens that spell a surrogate, not UTF-8 (``worker.surrogate_bytes``).
    ``vocabulary``: each token's bytes (xgrammar's decoded vocabulary).
    ``blanks``: tab, newline and carriage return are taken (text with strict calls in it, whose
    format has newlines around each call)."""
    banned = {i for i in special_ids(tokenizer) if i < len(vocabulary)}
    allowed = BLANKS if blanks else b""
    banned |= {
        i
        for i, raw in enumerate(vocabulary)
        if any(b < 0x20 and b not in allowed for b in raw) or has_surrogate(raw)
    }
    return banned - stop_ids


BLANKS = b"\t\n\r"


def _words_without(size: int, banned: set[int] | frozenset[int]) -> torch.Tensor:
    """xgrammar's bitmask words (int32, bit ``t % 32`` of word ``t // 32`` for token ``t``) that
    allow every one of ``size`` tokens but ``banned``."""
    words = [0xFFFFFFFF] * -(-size // 32)
    for token in banned:
        words[token // 32] &= ~(1 << (token % 32))
    return torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in words], dtype=torch.int32)


_SOURCE_PLACE = re.compile(r"(?:^|(?<=\s))\S+\.(?:cc|cpp|cxx|h|hpp|py):\d+:\s*")
_LOG_TIME = re.compile(r"\[\d{1,2}:\d{2}:\d{2}\]\s*")


def _first_line(exc: BaseException) -> str:
    """An xgrammar error's first line, without its "[time] " and its C++ source "file.cc:line: "
    wherever they are (the client gets the reason, not the library's source tree)."""
    return library_reason(str(exc)) or type(exc).__name__


def refused_field(request: GenerationRequest) -> str | None:
    """The field whose grammar the compiler refused (both engines): beside tools, the JSON
    answer's ``response_format`` when its schema alone does not compile (the compiler names
    neither), else the field the grammar comes from (``tools``, ``response_format``)."""
    field = request.grammar_field()
    answer = request.json_or_calls()
    if field == "tools" and answer is not None:
        import xgrammar

        try:
            xgrammar.Grammar.from_json_schema(json.dumps(answer))
        except (RuntimeError, ValueError, TypeError):
            return "response_format"
    return field


def library_reason(text: str) -> str:
    """The first line of a library's error (xgrammar's, or vLLM's that quotes it), without the
    times and C++ source places it holds."""
    lines = [line for line in text.splitlines() if line.strip()]
    first = _LOG_TIME.sub("", lines[0]) if lines else ""
    return _SOURCE_PLACE.sub("", first).strip()


class _Compiling:
    """One schema's compile: its lock, and the threads that hold it or wait for it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class Grammars:
    """A model's JSON grammars: compiled by xgrammar for its tokenizer, each schema once."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_ids = sorted(stop_ids)
        self._compiler: Any = None
        self.allowed: torch.Tensor | None = None  # bitmask words: what a JSON grammar may ever allow
        self.allowed_calls: torch.Tensor | None = None  # and strict calls' (blanks too)
        self.guard: SurrogateGuard | None = None  # no surrogate across two tokens:
        self.after_lead: torch.Tensor | None = None  # what may follow a token that ends with ED
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        # Slot threads compile a job's grammar before it joins the engine (``prepare``), so a
        # slow schema (seconds for a long maxLength on a large vocabulary) never stalls the
        # engine thread; that thread only finds it in the cache. Jobs with the same schema wait
        # for one compile; others compile beside it (xgrammar's compiler takes calls from
        # several threads, as vLLM's pool makes them), so one slow schema holds up no other.
        self._cache_lock = threading.Lock()
        self._setup_lock = threading.Lock()
        self._compiling: dict[str, _Compiling] = {}  # under _cache_lock

    def _grammar_compiler(self) -> Any:
        if self._compiler is not None:  # set up once: no lock after that
            return self._compiler
        with self._setup_lock:
            return self._compiler or self._set_up()

    def _set_up(self) -> Any:
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_ids or None
            )
            compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            vocabulary, stops = info.decoded_vocab, set(self._stop_ids)
            size = len(vocabulary)
            self.allowed = _words_without(size, not_json_ids(self._tokenizer, vocabulary, stops))
            self.allowed_calls = _words_without(size, not_json_ids(self._tokenizer, vocabulary, stops, True))
            self.guard = SurrogateGuard(vocabulary)
            self.after_lead = _words_without(size, self.guard.after_lead)
            self._compiler = compiler  # last: a thread that finds it finds the masks set up too
        return self._compiler

    def compiled(self, request: GenerationRequest) -> Any | None:
        """The request's compiled grammar (None: it asks for no JSON); InvalidJobRequest naming
        ``response_format`` when xgrammar cannot compile its schema."""
        if request.json_schema is not None:
            # Its keys in their order: properties come in the order the schema lists them.
            key = json.dumps(request.json_schema, separators=(",", ":"))
        elif request.json_object:
            key = ANY_OBJECT
        elif request.structural_tag is not None:  # strict functions' calls (api.strict_tools)
            key = TAG + json.dumps(request.structural_tag, separators=(",", ":"))
        else:
            return None
        found = self._cached(key)
        if found is not None:
            return found
        with self._cache_lock:
            compiling = self._compiling.setdefault(key, _Compiling())
            compiling.users += 1
        try:
            return self._compile(request, key, compiling.lock)
        finally:
            with self._cache_lock:
                compiling.users -= 1
                if not compiling.users:  # the last one out: no thread holds or waits for it
                    del self._compiling[key]

    def _compile(self, request: GenerationRequest, key: str, compiling: threading.Lock) -> Any:
        with compiling:
            found = self._cached(key)  # compiled by another thread meanwhile
            if found is not None:
                return found
            try:
                compiler = self._grammar_compiler()
                if key.startswith(TAG):
                    grammar = compiler.compile_structural_tag(key.removeprefix(TAG))
                else:
                    grammar = compiler.compile_json_schema(
                        key, any_whitespace=False, separators=JSON_SEPARATORS
                    )
            except (RuntimeError, ValueError, TypeError) as exc:
                field = refused_field(request) or "response_format"
                raise InvalidJobRequest(
                    f"{field}: this JSON schema cannot be used for constrained decoding ({_first_line(exc)})",
                    param=field,
                ) from exc
            with self._cache_lock:  # before the next waiter looks
                self._compiled[key] = grammar
                while len(self._compiled) > GRAMMAR_CACHE:
                    self._compiled.popitem(last=False)
            return grammar

    def _cached(self, key: str) -> Any | None:
        with self._cache_lock:
            found = self._compiled.get(key)
            if found is not None:
                self._compiled.move_to_end(key)
            return found

    def matcher(self, request: GenerationRequest, replay: list[int]) -> Any | None:
        """A new matcher for the request's grammar, past the tokens of ``replay`` (an earlier
        run's answer), or None when it asks for no JSON."""
        grammar = self.compiled(request)
        if grammar is None:
            return None
        import xgrammar

        matcher = xgrammar.GrammarMatcher(grammar)
        for token in replay:
            if not matcher.accept_token(token):  # not the request's fault: the earlier run's
                raise CannotContinue(
                    "its worker stopped mid-answer, and the answer so far does not follow this "
                    "engine's grammar for its JSON: send the request again"
                )
        return matcher


class _Tokens:
    """Distinct token ids, as a set and as an index tensor on the device (grown as new ones come):
    penalties touch only the logits of these, not the whole vocabulary."""

    def __init__(self, tokens: list[int], device: Any) -> None:
        self.ids = set(tokens)
        self.index = torch.tensor(sorted(self.ids), dtype=torch.long, device=device)

    def add(self, token: int) -> None:
        if token not in self.ids:
            self.ids.add(token)
            self.index = torch.cat([self.index, self.index.new_tensor([token])])


class JobRules:
    """One job's logit bias, penalties and grammar matcher, and the token counts they need."""

    def __init__(
        self,
        request: GenerationRequest,
        prompt: list[int],
        answer: list[int],
        vocab_size: int,
        device: Any,
        matcher: Any | None = None,
        allowed: torch.Tensor | None = None,
        surrogates: tuple[SurrogateGuard, torch.Tensor] | None = None,
    ) -> None:
        for token in request.logit_bias:
            if not 0 <= token < vocab_size:
                raise InvalidJobRequest(
                    f"logit_bias: token id {token} is not in this model's vocabulary (0 to {vocab_size - 1})",
                    param="logit_bias",
                )
        self.bias: tuple[torch.Tensor, torch.Tensor] | None = None
        if request.logit_bias:
            ids = torch.tensor(list(request.logit_bias), dtype=torch.long, device=device)
            values = torch.tensor(list(request.logit_bias.values()), dtype=torch.float32, device=device)
            self.bias = (ids, values)
        self.presence = request.presence_penalty
        self.frequency = request.frequency_penalty
        self.repetition = request.repetition_penalty
        self.answered: _Tokens | None = None  # the answer's tokens and their counts: frequency, presence
        self.counts = torch.zeros(0)
        if self.presence or self.frequency:
            self.answered = _Tokens(answer, device)
            self.counts = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            if answer:
                ones = torch.ones(len(answer), dtype=torch.float32, device=device)
                self.counts.index_add_(0, torch.tensor(answer, device=device), ones)
        # The prompt's and the answer's tokens: repetition.
        self.repeated = _Tokens(prompt + answer, device) if self.repetition != 1.0 else None
        self.matcher = matcher
        # What its grammar may ever allow: no special token, no raw control character in a JSON
        # answer (Grammars.allowed); tabs and newlines too around strict calls (allowed_calls).
        self.allowed = allowed
        # No surrogate across two tokens: what may follow a token that ends with ED, and the
        # last token (the prompt's last, before the answer's first: a continued answer's).
        self.surrogates = surrogates
        earlier = answer or prompt
        self.last: int | None = earlier[-1] if earlier else None

    @classmethod
    def of(
        cls, request: GenerationRequest, prompt: list[int], answer: list[int], grammars: Grammars, device: Any
    ) -> JobRules | None:
        """The job's rules, or None when it has none (a plain job)."""
        if not RULED & set(request.engine_features()):
            return None
        matcher = grammars.matcher(request, answer)
        # Free text with strict calls keeps tabs and newlines; a JSON answer (calls beside it too) not.
        calls_in_text = request.structural_tag is not None and request.json_or_calls() is None
        allowed = grammars.allowed_calls if calls_in_text else grammars.allowed
        surrogates = None
        if matcher is not None and grammars.guard is not None and grammars.after_lead is not None:
            surrogates = (grammars.guard, grammars.after_lead)
        return cls(request, prompt, answer, grammars.vocab_size, device, matcher, allowed, surrogates)

    def adjust(self, row: torch.Tensor) -> None:
        """Bias and penalties on one job's float32 logits row, in place."""
        if self.bias is not None:
            row.index_add_(0, self.bias[0], self.bias[1])
        if self.repeated is not None:
            index = self.repeated.index
            values = row[index]
            row[index] = torch.where(values > 0, values / self.repetition, values * self.repetition)
        if self.answered is not None:
            index = self.answered.index
            row.index_add_(0, index, -(self.frequency * self.counts[index] + self.presence))

    def accept(self, token: int) -> None:
        """The token the job took (an end of sequence ends the job: nothing to count)."""
        self.last = token
        if self.answered is not None:
            self.counts[token] += 1
            self.answered.add(token)
        if self.repeated is not None:
            self.repeated.add(token)
        if self.matcher is not None and not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} broke the job's grammar (its mask allowed it)")


def apply_rules(logits: torch.Tensor, rules: list[JobRules]) -> None:
    """Each row's rules on a float32 ``[rows, vocab]`` block of logits, in place: bias and
    penalties row by row, then the grammar masks of the rows that have one, in one pass, each
    within what its grammar may ever allow (``JobRules.allowed``)."""
    for i, rule in enumerate(rules):
        rule.adjust(logits[i])
    matchers = {i: rule.matcher for i, rule in enumerate(rules) if rule.matcher is not None}
    if not matchers:
        return
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(rules), logits.shape[-1])
    for i, matcher in matchers.items():
        matcher.fill_next_token_bitmask(bitmask, i)
    rows = list(matchers)
    for i in rows:
        if (allowed := rules[i].allowed) is not None:
            bitmask[i] &= allowed
        if (surrogates := rules[i].surrogates) is not None and surrogates[0].leaves_lead(rules[i].last):
            bitmask[i] &= surrogates[1]
    xgrammar.apply_token_bitmask_inplace(
        logits,
        bitmask.to(logits.device, non_blocking=True),
        indices=rows,
        backend="cpu" if logits.device.type == "cpu" else "torch_native",
    )
