"""The vLLM tests' guard: skipped where vLLM's engine is not installed, except where
STREAMQ_REQUIRE_VLLM=1 (CI sets it), where a missing vLLM fails them instead."""

from __future__ import annotations

import os

import pytest


def need_vllm() -> None:
    """Skip the calling test module unless vLLM is installed (or required)."""
    if os.environ.get("STREAMQ_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm", reason="the vLLM engine is not installed (make install-vllm)")
