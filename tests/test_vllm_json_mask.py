"""The vLLM engine's JSON mask (worker/vllm_json_mask.py), a vLLM logits processor, driven as
vLLM's sampler drives it: built from a real ``VllmConfig`` of the tiny model, told of its batch
by vLLM's own ``BatchUpdate``s (requests added, removed, moved and swapped between rows), and
applied to a batch of logits. The engine itself runs it in tests/test_vllm_engine.py (a tab
pushed by logit_bias stays out of a JSON answer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.vllm_required import need_vllm

need_vllm()

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def mask(hd64_model: Path) -> Any:
    import torch
    from vllm.config import ModelConfig, VllmConfig

    from worker.vllm_json_mask import JsonAnswerMask

    config = VllmConfig(model_config=ModelConfig(model=str(hd64_model), dtype="float32"))
    return JsonAnswerMask(config, torch.device("cpu"), False)


def test_a_json_request_loses_special_and_control_tokens_but_keeps_its_own_stops(
    mask: Any, hd64_model: Path
) -> None:
    import torch
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from worker.vllm_json_mask import JSON_MASK

    tokenizer = AutoTokenizer.from_pretrained(hd64_model)
    vocab = len(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    newlines = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))
    letters = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a"))
    # A token gives its id, a list of them a list.
    assert isinstance(end, int) and isinstance(start, int)
    assert isinstance(newlines, list) and isinstance(letters, list)
    newline, letter = newlines[0], letters[0]

    def params(json: bool, stops: list[int]) -> SamplingParams:
        return SamplingParams(stop_token_ids=stops, extra_args={JSON_MASK: True} if json else None)

    def masked(rows: int) -> list[set[int]]:
        logits = torch.zeros(rows, vocab)
        mask.apply(logits)
        return [set(torch.nonzero(torch.isinf(row)).flatten().tolist()) for row in logits]

    # Rows 0 and 2 ask for the mask (with different stops), row 1 does not.
    added: list[tuple[int, SamplingParams, list[int], list[int]]] = [
        (0, params(True, [end]), [1], []),
        (1, params(False, [end]), [1], []),
        (2, params(True, []), [1], []),
    ]
    mask.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    first, plain, no_stops = masked(3)
    assert plain == set()
    assert {start, newline} <= first and end not in first and letter not in first  # its end stays
    assert no_stops == first | {end}  # a request's own stop tokens are all it keeps

    # vLLM condenses its batch: row 0 leaves, row 2 moves into it; then rows 0 and 1 swap.
    mask.update_state(
        BatchUpdate(batch_size=2, removed=[0], added=[], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)])
    )
    assert masked(2) == [no_stops, set()]
    mask.update_state(
        BatchUpdate(batch_size=2, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)])
    )
    assert masked(2) == [set(), no_stops]
    # After a token that ends with ED (the answer's last, or the prompt's before the answer: a
    # continued one's), no token that begins with A0-BF: a surrogate is not UTF-8.
    lead, high = surrogate_bytes(hd64_model)
    answer = [lead]
    mask.update_state(
        BatchUpdate(batch_size=2, removed=[], added=[(0, params(True, []), [1, lead], [])], moved=[])
    )
    assert masked(2) == [no_stops | high, no_stops]
    mask.update_state(
        BatchUpdate(batch_size=2, removed=[], added=[(0, params(True, []), [1], answer)], moved=[])
    )
    assert masked(2)[0] == no_stops | high
    answer.append(letter)  # vLLM's live list of the answer's ids grows
    assert masked(2)[0] == no_stops
    answer.append(-1)  # a placeholder (async scheduling): not known, nothing more banned
    assert masked(2)[0] == no_stops
    mask.update_state(
        BatchUpdate(batch_size=2, removed=[], added=[(0, params(False, []), [1], [])], moved=[])
    )
    # A new plain request takes the masked request's row.
    mask.update_state(
        BatchUpdate(batch_size=2, removed=[], added=[(1, params(False, []), [1], [])], moved=[])
    )
    assert masked(2) == [set(), set()]


def surrogate_bytes(model: Path) -> tuple[int, set[int]]:
    """The model's token of the byte ED alone, and its tokens that begin with A0-BF."""
    import xgrammar
    from transformers import AutoTokenizer

    vocabulary = xgrammar.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(model)).decoded_vocab
    return vocabulary.index(b"\xed"), {
        i for i, raw in enumerate(vocabulary) if raw and 0xA0 <= raw[0] <= 0xBF
    }


def test_model_runner_v2_takes_its_own_mask_which_follows_its_slots(
    mask: Any, hd64_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's Model Runner V2 (its default on GPUs with Triton) refuses a processor of the first
    runner's interface at the engine's start, and takes at most 1,024 allowed_token_ids: it gets
    JsonAnswerMaskV2, whose rows are found through each step's slot mapping."""
    import numpy as np
    import torch
    import vllm.envs
    from vllm import SamplingParams
    from vllm.config import ModelConfig, VllmConfig
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        build_custom_logits_processors_params_validator,
    )

    from worker.vllm_json_mask import JSON_MASK, PROCESSOR, PROCESSOR_V2, JsonAnswerMaskV2, processor_for

    config = VllmConfig(model_config=ModelConfig(model=str(hd64_model), dtype="float32"))
    assert processor_for(config) == PROCESSOR  # this CPU build has no Triton: the first runner
    # vLLM caches its environment once an engine started (another test's, in this process): the
    # cache is emptied around the variable's change, and again once it is taken back.
    fresh_environment = getattr(vllm.envs.__getattr__, "cache_clear", lambda: None)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    fresh_environment()
    try:
        assert processor_for(config) == PROCESSOR_V2
    finally:
        monkeypatch.undo()
        fresh_environment()
    build_custom_logits_processors_params_validator([PROCESSOR_V2])  # V2's own check at the start
    with pytest.raises(ValueError, match="not a subclass"):
        build_custom_logits_processors_params_validator([PROCESSOR])

    vocab = int(config.model_config.get_vocab_size())
    state = LogitsProcRequestState(torch.device("cpu"), 4, vocab, None, None, None, None)
    v2 = JsonAnswerMaskV2(config, state)
    json_params = SamplingParams(stop_token_ids=[5], extra_args={JSON_MASK: True})
    assert v2.add_request(2, json_params) and not v2.add_request(0, SamplingParams())

    def masked(slots: list[int], previous: list[int] | None = None) -> list[set[int]]:
        v2.apply_staged_writes()
        mapping = torch.tensor(slots)
        inputs = torch.tensor(previous or [0] * len(slots), dtype=torch.int32)  # each row's last token
        ctx = LogitsContext(
            mapping, mapping, np.array(slots), mapping * 0, inputs, mapping * 0, np.ones(len(slots))
        )
        logits = v2.apply(torch.zeros(len(slots), vocab), ctx)
        return [set(torch.nonzero(torch.isinf(row)).flatten().tolist()) for row in logits]

    # What the first runner's mask bans for the same request (its stops allowed).
    mask.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, json_params, [1], [])], moved=[]))
    first_runner = mask.apply(torch.zeros(1, vocab))
    expected = set(torch.nonzero(torch.isinf(first_runner[0])).flatten().tolist())
    assert expected and 5 not in expected
    assert masked([0, 2]) == [set(), expected]  # rows follow the step's mapping: slot 2 is row 1
    assert masked([2, 0]) == [expected, set()]
    # After a token that ends with ED, no token that begins with A0-BF (a surrogate), in that row only.
    lead, high = surrogate_bytes(hd64_model)
    assert masked([2, 0], [lead, lead]) == [expected | high, set()]
    assert masked([2, 0], [ordered[0] if (ordered := sorted(high)) else 0, lead])[0] == expected
    v2.add_request(2, SamplingParams())  # slot 2 reused by a plain request
    assert masked([0, 2]) == [set(), set()]
