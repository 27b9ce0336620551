"""The garbage collector of a long-running process, set once its long-lived objects exist."""

from __future__ import annotations

import gc

from shared.settings import Settings


def settle_heap(settings: Settings) -> None:
    """With ``STREAMQ_GC_FREEZE``, collect once, then freeze what is alive (modules, the app or the model,
    pools, clients) out of the collector's sight, so that an old-generation collection walks only
    what was made since (what is frozen is never collected: a start-up object that later
    becomes garbage in a cycle stays); and collect the young generation every
    ``STREAMQ_GC_YOUNG_THRESHOLD`` allocations instead of Python's default (0: leave it). Under load both
    shorten the pauses that queue every request in the process behind one collection (measured
    in the README's submits and fan-out tables)."""
    if settings.gc_freeze:
        gc.collect()
        gc.freeze()
    if settings.gc_young_threshold:
        _, middle, old = gc.get_threshold()
        gc.set_threshold(settings.gc_young_threshold, middle, old)


def release_heap() -> None:
    """Give what ``settle_heap`` froze back to the collector, as the process stops: the
    interpreter's last collections free it then, as they would have without the freeze
    (native extensions such as triton's report what is still alive at exit as leaks)."""
    gc.unfreeze()
