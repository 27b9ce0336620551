"""vLLM on a CPU: the settings only its environment takes, the KV cache's size when none is set,
and the attention head sizes its CPU kernels run (checked before the engine starts, so that a
worker never reports ready and then fails every job)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from shared.settings import Settings
from worker.engine_setup import head_size

log = logging.getLogger("streamq.worker")

GiB = 2**30
DEFAULT_KV_CACHE = 4 * GiB  # on a CPU, with STREAMQ_KV_CACHE_GIB unset (or half the free memory)


def set_cpu_defaults(settings: Settings) -> None:
    """vLLM's CPU settings that only its environment takes, where the user has not set them: its
    threads bound to the cores this process may use (its default keeps one core for itself:
    85 against 120 tok/s on 2 cores), and its distributed setup on the loopback address."""
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if settings.kv_cache_gib and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        log.warning(
            "VLLM_CPU_KVCACHE_SPACE=%s GiB overrides STREAMQ_KV_CACHE_GIB=%g in vLLM: unset one of them",
            os.environ["VLLM_CPU_KVCACHE_SPACE"],
            settings.kv_cache_gib,
        )
    if settings.tensor_parallel_size == 1 and settings.pipeline_parallel_size == 1:
        cores = sorted(os.sched_getaffinity(0))
        if settings.torch_threads:
            cores = cores[: settings.torch_threads]
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))


def default_kv_cache_bytes(job_tokens: int, per_token: int | None) -> int | None:
    """The KV cache of a worker on a CPU when STREAMQ_KV_CACHE_GIB is unset (None when vLLM's own
    VLLM_CPU_KVCACHE_SPACE is set: it decides): 4 GiB, or half the
    memory available now if that is less. (vLLM's own default reserves 92% of the machine's
    memory, and will not start where less than that is free: on any machine that runs anything
    else.) ValueError when that cannot hold one job of ``job_tokens`` tokens."""
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # vLLM's own variable, set: it decides
        return None
    size = min(DEFAULT_KV_CACHE, available_memory() // 2)
    if per_token and size // per_token < job_tokens:
        raise ValueError(
            f"half the memory available ({size / GiB:.2f} GiB) holds about {size // per_token} "
            f"tokens of this model's KV cache, and one job may take {job_tokens} "
            "(STREAMQ_MAX_SEQ_LEN): set STREAMQ_KV_CACHE_GIB, or lower STREAMQ_MAX_SEQ_LEN"
        )
    return size


def available_memory() -> int:
    """The memory this process may still take: the machine's available memory, or less where
    its cgroup (a container's limit, or a parent's) leaves less."""
    import psutil  # vLLM's requirement (this module is imported without vLLM too)

    machine = int(psutil.virtual_memory().available)
    headroom = cgroup_headroom()
    return machine if headroom is None else min(machine, headroom)


UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number about 2**63


def cgroup_headroom(
    membership: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int | None:
    """Limit less usage of the tightest memory limit on this process's cgroup and its
    ancestors (v2 ``memory.max``/``memory.current``, v1 ``memory.limit_in_bytes``/
    ``memory.usage_in_bytes``), or None where none is set or none can be read. Inside a
    container the mount's root is the container's own cgroup, so a path the membership names
    that is not mounted is skipped, and the walk goes on up to the root."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    tightest: int | None = None
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2's unified hierarchy
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base, files = (
                root / "memory",
                ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
            )
        else:
            continue
        folder = base / path.lstrip("/")
        while True:
            headroom = _headroom(folder, *files)
            if headroom is not None and (tightest is None or headroom < tightest):
                tightest = headroom
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return tightest


def _headroom(folder: Path, limit_file: str, usage_file: str, cache_stat: str) -> int | None:
    """A cgroup's limit less what it uses, not counting file cache the kernel can drop (as the
    kubelet and docker count it: a model just read would otherwise leave no room)."""
    try:
        limit_text = (folder / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= UNLIMITED:
            return None
        used = int((folder / usage_file).read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        stats = dict(
            line.split(" ", 1) for line in (folder / "memory.stat").read_text().splitlines() if " " in line
        )
        used -= int(stats.get(cache_stat, 0))
    except (OSError, ValueError):
        pass
    return max(0, int(limit_text) - used)


def check_head_size(config: Any) -> None:
    """Refuse a model whose head size vLLM's CPU attention does not run (its list, from vLLM)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except (ImportError, AttributeError):  # another vLLM: leave the check to it
        return
    head = head_size(config)
    if head is not None and supported and head not in supported:
        raise ValueError(
            f"vLLM's CPU attention runs head sizes {', '.join(map(str, supported))}; this model's "
            f"is {head}: serve it with --engine transformers (or on a GPU)"
        )
