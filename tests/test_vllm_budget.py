"""The vLLM engine's KV budget is each GPU's: a model split over GPUs holds its share of each
token's keys and values on each (a budget that fits was refused at twice the size it needs)."""

from __future__ import annotations

import pytest

from shared.settings import Settings
from worker.vllm_setup import VLLMServed, check_kv_budget, per_gpu


@pytest.mark.parametrize(("tensor", "pipeline", "fits"), [(1, 1, False), (2, 1, True), (1, 2, True)])
def test_a_kv_budget_is_each_gpus(tensor: int, pipeline: int, fits: bool) -> None:
    served = VLLMServed("m", None, "m", "cuda", "auto", set())
    served.kv_bytes_per_token = 2**20  # 1 GiB holds 1,024 tokens on one GPU, 2,048 split over two
    settings = Settings(kv_cache_gib=1, tensor_parallel_size=tensor, pipeline_parallel_size=pipeline)
    if fits:
        check_kv_budget(settings, served, 1500)
    else:
        with pytest.raises(ValueError, match=r"holds about 1024 tokens .* at least 1\.465 GiB"):
            check_kv_budget(settings, served, 1500)


def test_a_gpu_holds_its_layers_and_heads_of_a_token() -> None:
    """Fewer key-value heads than tensor shards are copied, one on each (a budget that vLLM then
    refused passed the check); pipeline stages that do not divide the layers hold one more."""
    per_token = 24 * 2 * 1000  # 24 layers, 2 heads, 1,000 bytes a head
    assert per_gpu(per_token, (24, 2), 2, 1) == per_token // 2
    assert per_gpu(per_token, (24, 2), 4, 1) == per_token // 2  # a head each, not half a head
    assert per_gpu(per_token, (24, 2), 1, 5) == 5 * 2 * 1000  # ceil(24 / 5) = 5 layers
    assert per_gpu(per_token, None, 2, 2) == per_token // 4
