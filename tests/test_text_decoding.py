"""Incremental detokenization and stop sequences."""

from __future__ import annotations

from typing import Any

import pytest

from worker.text_decoding import REPLACEMENT_CHAR, IncrementalDecoder, StopMatcher


def test_deltas_never_split_a_character(tiny_backend: Any) -> None:
    tokenizer = tiny_backend.tokenizer
    text = "你好，世界！ Größe naïve 🙂🚀 streams"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Byte-level pieces: several tokens carry part of one character.
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_random_token_sequences_decode_the_same_as_a_whole(tiny_backend: Any) -> None:
    import random

    tokenizer = tiny_backend.tokenizer
    rng = random.Random(7)
    for _ in range(20):
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(40)]
        decoder = IncrementalDecoder(tokenizer)
        text = "".join(decoder.push(i) for i in ids) + decoder.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "stopped"),
    [
        (["Hello wor", "ld. Bye"], ["world"], "Hello ", True),
        (["abc", "END", "more"], ["END"], "abc", True),
        (["a", "E", "N", "x"], ["END"], "aENx", False),
        (["one\n\nUser:", " two"], ["\n\nUser:", "###"], "one", True),
        (["no stop here"], [], "no stop here", False),
    ],
)
def test_stop_sequences_end_the_text_and_are_not_emitted(
    pieces: list[str], stops: list[str], emitted: str, stopped: bool
) -> None:
    matcher = StopMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = matcher.push(piece)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (emitted, stopped)


def test_a_possible_stop_prefix_is_held_back_until_resolved() -> None:
    matcher = StopMatcher(["</s>"])
    assert matcher.push("answer </") == ("answer ", False)
    assert matcher.push("b>") == ("</b>", False)
