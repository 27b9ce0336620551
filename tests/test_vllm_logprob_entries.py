"""The vLLM engine's log probability entries (worker/vllm_engine.py) made from vLLM's own
``Logprob`` dicts: the token's, and the top tokens in order of rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vllm_required import need_vllm

need_vllm()

pytestmark = pytest.mark.e2e


def test_log_probability_entries_take_vllms_top_tokens_in_order_of_rank(hd64_model: Path) -> None:
    from transformers import AutoTokenizer
    from vllm.logprobs import Logprob

    from worker.token_logprobs import TokenTexts
    from worker.vllm_engine import _logprob_entry

    texts = TokenTexts(AutoTokenizer.from_pretrained(hd64_model))

    def alternatives(token: int, place: dict[int, Logprob], k: int) -> list[tuple[bytes, float]]:
        entry = _logprob_entry(texts, token, place, k)
        assert entry.logprob == place[token].logprob and entry.bytes == list(texts.token_bytes(token))
        return [(bytes(t.bytes or []), t.logprob) for t in entry.top_logprobs]

    def b(token: int) -> bytes:
        return texts.token_bytes(token)

    # vLLM's dict: the sampled token first, then the k most likely (a repeat keeps its first place).
    outside = {50: Logprob(-4.0, rank=9), 40: Logprob(-0.5, rank=1), 41: Logprob(-1.5, rank=2)}
    assert alternatives(50, outside, 2) == [(b(40), -0.5), (b(41), -1.5)]
    among = {41: Logprob(-1.5, rank=2), 40: Logprob(-0.5, rank=1), 42: Logprob(-2.0, rank=3)}
    assert alternatives(41, among, 3) == [(b(40), -0.5), (b(41), -1.5), (b(42), -2.0)]
    assert alternatives(50, {50: Logprob(-4.0, rank=9)}, 0) == []
