"""The vLLM engine's JSON mask (worker/vllm_json_mask.py), a vLLM logits processor, driven as
vLLM's sampler drives it: built from a real ``VllmConfig`` of the tiny model, told of its batch
by vLLM's own ``BatchUpdate``s (requests added, removed, moved and swapped between rows), and
applied to a batch of logits. The engine itself runs it in tests/test_vllm_engine.py (a tab
pushed by logit_bias stays out of a JSON answer)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("STREAMQ_REQUIRE_VLLM") != "1":  # CI sets it: there, a missing vLLM fails
    pytest.importorskip("vllm", reason="the vLLM engine is not installed (make install-vllm)")

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
    newline = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("\n"))[0]
    letter = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("a"))[0]

    def params(json: bool, stops: list[int]) -> SamplingParams:
        return SamplingParams(stop_token_ids=stops, extra_args={JSON_MASK: True} if json else None)

    def masked(rows: int) -> list[set[int]]:
        logits = torch.zeros(rows, vocab)
        mask.apply(logits)
        return [set(torch.nonzero(torch.isinf(row)).flatten().tolist()) for row in logits]

    # Rows 0 and 2 ask for the mask (with different stops), row 1 does not.
    added = [
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
    # A new plain request takes the masked request's row.
    mask.update_state(
        BatchUpdate(batch_size=2, removed=[], added=[(1, params(False, []), [1], [])], moved=[])
    )
    assert masked(2) == [set(), set()]
