"""The transformers engine's KV cache grows one layer at a time: what it held stays, and a growth
cut short (out of memory midway) leaves a cache that works at its old length and grows on."""

from __future__ import annotations

import torch

from worker.slot_cache import GROWTH, SlotCache


def _filled(layers: int) -> SlotCache:
    cache = SlotCache(slots=2, max_len=4 * GROWTH)
    cache.capacity = GROWTH
    for _ in range(layers):
        cache._allocate_layer(torch.empty(1, 3, 1, 8))
    for tensor in (*cache.keys, *cache.values):
        tensor.copy_(torch.randn_like(tensor))
    return cache


def test_growth_keeps_every_layer_and_goes_on_after_one_cut_short() -> None:
    cache = _filled(layers=3)
    before = [t.clone() for t in (*cache.keys, *cache.values)]
    # As if an out-of-memory error had stopped an earlier growth after the first layer.
    first = cache.keys[0]
    cache.keys[0] = first.new_zeros((*first.shape[:2], 2 * GROWTH, first.shape[3]))
    cache.keys[0][:, :, :GROWTH] = first
    assert cache.capacity == GROWTH  # still usable at its old length
    cache.ensure(GROWTH + 1)
    assert cache.capacity == 2 * GROWTH
    for old, new in zip(before, (*cache.keys, *cache.values), strict=True):
        assert new.shape[2] == 2 * GROWTH
        assert torch.equal(new[:, :, :GROWTH], old) and not new[:, :, GROWTH:].any()
    assert cache.nbytes() == 6 * 2 * 3 * 2 * GROWTH * 8 * 4
