"""The vLLM worker's switch interval: its process holds vLLM's scheduler beside streamq's threads
(worker.vllm_engine.set_switch_interval; the reason and the figures are in its docstring)."""

import sys
from collections.abc import Iterator

import pytest

from shared.settings import Settings
from worker.vllm_engine import set_switch_interval


@pytest.fixture(autouse=True)
def python_default() -> Iterator[float]:
    before = sys.getswitchinterval()
    yield before
    sys.setswitchinterval(before)


def test_the_vllm_worker_lets_its_threads_switch_every_millisecond_by_default() -> None:
    set_switch_interval(Settings())
    assert sys.getswitchinterval() == pytest.approx(0.001)


def test_the_setting_takes_another_interval_and_zero_leaves_pythons(python_default: float) -> None:
    set_switch_interval(Settings(vllm_switch_interval_ms=2.5))
    assert sys.getswitchinterval() == pytest.approx(0.0025)
    sys.setswitchinterval(python_default)
    set_switch_interval(Settings(vllm_switch_interval_ms=0))
    assert sys.getswitchinterval() == pytest.approx(python_default)
