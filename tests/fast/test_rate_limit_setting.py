"""``STREAMQ_KEY_RATE_LIMIT`` read as the README says: a rate per key, or no limit at all."""

from __future__ import annotations

import pytest
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from api.quotas import parse_rate_limit


@pytest.mark.parametrize("text", ["", "0", "0/minute", "0 per 10 seconds"])
def test_empty_or_zero_is_no_limit(text: str) -> None:
    """``0/minute`` was read as a limit of none per minute: every keyed request got a 429."""
    assert parse_rate_limit(text) is None


def test_a_rate_admits_that_many_requests_per_window() -> None:
    rate = parse_rate_limit("2 per 10 seconds")
    assert rate is not None
    limiter = MovingWindowRateLimiter(MemoryStorage())
    assert [limiter.hit(rate, "alice") for _ in range(3)] == [True, True, False]
    assert limiter.hit(rate, "bob")


@pytest.mark.parametrize("text", ["lots", "0/second;5/minute"])
def test_an_unreadable_rate_or_several_are_refused_naming_the_setting(text: str) -> None:
    with pytest.raises(ValueError, match=f"STREAMQ_KEY_RATE_LIMIT '{text}' is not one rate"):
        parse_rate_limit(text)
