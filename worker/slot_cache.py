"""The KV cache of a batch of jobs: one row per slot, each row at its own length.

transformers' attention layers call ``cache.update(key, value, layer_idx)`` with the new
keys and values of a forward pass and attend over what it returns. This cache keeps, per
layer, one preallocated ``[slots, kv_heads, capacity, head_dim]`` tensor for keys and one
for values; before each forward pass the engine says which rows it covers and where their
new tokens go (``bind_decode`` / ``bind_extend`` / ``bind_prefill``), and builds the
attention mask to match. Running jobs occupy rows ``0..n-1`` (the engine keeps them
packed with ``move``), so a decode step attends over a view, not a copy.

Memory is bounded: ``capacity`` grows in steps of ``GROWTH`` tokens up to ``max_len`` and
never beyond, so the cache never holds more than ``slots * max_len`` tokens.
"""

from __future__ import annotations

from typing import Any

import torch

GROWTH = 256


class SlotCache:
    is_compileable = False

    def __init__(self, slots: int, max_len: int) -> None:
        self.slots = slots
        self.max_len = max_len
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._mode = ""
        self._rows: list[int] = []
        self._positions: torch.Tensor | None = None
        self._start = 0
        self._lengths: list[int] = []
        self._pads: list[int] = []
        self._span = 0

    # What the next forward pass writes.

    def bind_decode(self, rows: int, positions: torch.Tensor, span: int) -> None:
        """One new token for rows ``0..rows-1``, at ``positions`` (a long tensor); ``span`` is
        ``max(positions) + 1``, the number of key positions attended."""
        self._mode, self._positions = "decode", positions
        self._rows = list(range(rows))
        self._span = span
        self.ensure(span)

    def bind_extend(self, row: int, start: int, count: int) -> int:
        """``count`` tokens of one row's prompt, from position ``start`` (a chunk of a long
        prompt). Returns the number of key positions attended (``start + count``)."""
        self._mode, self._rows, self._start = "extend", [row], start
        self._span = start + count
        self.ensure(self._span)
        return self._span

    def bind_prefill(self, rows: list[int], lengths: list[int], width: int) -> None:
        """Whole prompts of several rows in one left-padded batch ``width`` tokens wide: the
        last ``lengths[i]`` tokens of batch row i are row ``rows[i]``'s prompt. Attention runs
        over the batch's own keys; the cache keeps each row's real tokens at positions 0..n-1."""
        self._mode, self._rows, self._lengths = "prefill", rows, lengths
        self._pads = [width - n for n in lengths]
        self._span = width
        self.ensure(max(lengths))

    # transformers' Cache interface (the parts the attention layers and the model use).

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self._allocate_layer(key_states)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._mode == "decode":
            assert self._positions is not None
            rows = len(self._rows)
            index = torch.arange(rows, device=keys.device)
            keys[index, :, self._positions] = key_states[:, :, 0]
            values[index, :, self._positions] = value_states[:, :, 0]
            return keys[:rows, :, : self._span], values[:rows, :, : self._span]
        if self._mode == "extend":
            row, start, stop = self._rows[0], self._start, self._span
            keys[row, :, start:stop] = key_states[0]
            values[row, :, start:stop] = value_states[0]
            return keys[row : row + 1, :, :stop], values[row : row + 1, :, :stop]
        if self._mode == "prefill":
            for i, (row, pad) in enumerate(zip(self._rows, self._pads, strict=True)):
                keys[row, :, : self._lengths[i]] = key_states[i, :, pad:]
                values[row, :, : self._lengths[i]] = value_states[i, :, pad:]
            return key_states, value_states
        raise RuntimeError("SlotCache.update called before a bind_* call")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._span

    # Row management.

    def ensure(self, length: int) -> None:
        """Make room for ``length`` positions per row (grown in steps, never past max_len)."""
        if length > self.max_len:
            raise ValueError(f"{length} positions do not fit this cache's {self.max_len} per row")
        if length <= self.capacity:
            return
        new = min(self.max_len, -(-length // GROWTH) * GROWTH)
        # One layer at a time, each replaced as soon as it is copied: the growth needs one layer's
        # memory more, not the whole cache's again (slots are sized for the cache at max_len, so
        # growing all layers at once ran out of GPU memory past about 60% of it). An out-of-memory
        # error midway leaves some layers longer: the cache still works at its old capacity, and
        # the next call goes on from there.
        for tensors in (self.keys, self.values):
            for index, old in enumerate(tensors):
                if old.shape[2] >= new:
                    continue
                bigger = old.new_zeros((*old.shape[:2], new, old.shape[3]))
                bigger[:, :, : old.shape[2]] = old
                tensors[index] = bigger
                del old, bigger
        self.capacity = new

    def move(self, source: int, target: int, length: int) -> None:
        """Copy a row's first ``length`` positions to another row (to keep running rows packed)."""
        if source == target or length == 0:
            return
        for tensors in (self.keys, self.values):
            for layer in tensors:
                layer[target, :, :length] = layer[source, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def _allocate_layer(self, like: torch.Tensor) -> None:
        shape = (self.slots, like.shape[1], self.capacity, like.shape[3])
        self.keys.append(like.new_zeros(shape))
        self.values.append(like.new_zeros(shape))


# Masks: ``window`` is a sliding-window layer's reach (a query sees the last ``window`` keys up
# to itself); None for full attention.


def _causal(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    allowed = keys[None, :] <= queries[:, None]
    if window is not None:
        allowed &= keys[None, :] > queries[:, None] - window
    return allowed


def decode_mask(positions: torch.Tensor, span: int, dtype: torch.dtype, window: int | None) -> torch.Tensor:
    """Additive mask ``[rows, 1, 1, span]``: row b sees key positions ``0..positions[b]``."""
    keys = torch.arange(span, device=positions.device)
    return _additive(_causal(positions, keys, window)[:, None, None, :], dtype)


def extend_mask(start: int, count: int, dtype: torch.dtype, device: Any, window: int | None) -> torch.Tensor:
    """Additive causal mask ``[1, 1, count, start + count]`` for a chunk after ``start`` cached tokens."""
    queries = torch.arange(start, start + count, device=device)
    keys = torch.arange(start + count, device=device)
    return _additive(_causal(queries, keys, window)[None, None], dtype)


def prefill_mask(
    pads: list[int], width: int, dtype: torch.dtype, device: Any, window: int | None
) -> torch.Tensor:
    """Additive causal mask ``[batch, 1, width, width]`` for left-padded prompts: a token sees
    the tokens of its own prompt up to itself, never the padding."""
    positions = torch.arange(width, device=device)
    causal = _causal(positions, positions, window)
    starts = torch.tensor(pads, device=device)
    real = positions[None, :] >= starts[:, None]
    allowed = causal[None] & real[:, None, :]
    # A padding query would see nothing at all (a row of -inf gives NaN): let it see itself.
    allowed |= torch.eye(width, dtype=torch.bool, device=device)[None]
    return _additive(allowed[:, None], dtype)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
