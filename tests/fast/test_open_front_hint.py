"""An open front says why it is open: an operator who set the clients' ``STREAMQ_API_KEY`` where
the front's ``STREAMQ_API_KEYS`` was meant got a front open to anyone, with no word about it."""

from __future__ import annotations

import logging

import pytest

from api.auth import ApiKeys
from tests.fast.conftest import _settings, open_front

pytestmark = pytest.mark.anyio


async def test_an_open_front_names_the_clients_variable_set_in_its_place(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("STREAMQ_API_KEY", "sk-meant-for-the-front")
    with caplog.at_level(logging.WARNING, logger="streamq.api"):
        async for front in open_front(_settings(), ApiKeys([])):
            assert (await front.http.get("/healthz")).status_code == 200
    said = [r.getMessage() for r in caplog.records if "no API keys configured" in r.getMessage()]
    assert said and "the front's keys are STREAMQ_API_KEYS" in said[0], said
    assert "sk-meant-for-the-front" not in caplog.text
