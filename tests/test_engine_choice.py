"""Which engine a worker picks (``STREAMQ_ENGINE``): asked for by name, or ``auto``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from shared.settings import Settings
from worker.engine_choice import choose_engine

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_engine_asked_for_by_name_is_the_one_used(device: str, tiny_model: Path) -> None:
    for name in ("transformers", "vllm"):
        assert choose_engine(Settings(engine=name, model=str(tiny_model)), device) == name


def test_auto_keeps_transformers_on_a_cpu(tiny_model: Path) -> None:
    assert choose_engine(Settings(model=str(tiny_model)), "cpu") == "transformers"


def test_auto_keeps_transformers_for_a_model_with_its_own_code(tiny_model: Path) -> None:
    settings = Settings(model=str(tiny_model), trust_remote_code=True)
    assert choose_engine(settings, "cuda") == "transformers"


def test_auto_takes_vllm_on_a_gpu_for_an_architecture_it_serves(tiny_model: Path, tmp_path: Path) -> None:
    expected = "vllm" if HAS_VLLM else "transformers"  # without vLLM installed, auto cannot take it
    assert choose_engine(Settings(model=str(tiny_model)), "cuda") == expected
    if HAS_VLLM:  # an architecture vLLM has no implementation of stays on transformers
        config = (
            (tiny_model / "config.json").read_text().replace("Qwen2ForCausalLM", "NoSuchModelForCausalLM")
        )
        (tmp_path / "config.json").write_text(config)
        assert choose_engine(Settings(model=str(tmp_path)), "cuda") == "transformers"


def test_engine_setting_refuses_an_unknown_engine() -> None:
    with pytest.raises(ValueError, match="engine"):
        Settings(engine="tensorrt")
