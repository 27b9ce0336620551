"""The memory a CPU worker sizes vLLM's KV cache from: the machine's available memory, or less
where a cgroup (a container's limit) leaves less. The cgroup files are laid out in a temporary
folder as the kernel shows them in each case."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.vllm_cpu import cgroup_headroom

GiB = 2**30


def _layout(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cgroup").write_text(membership)
    root = tmp_path / "sys"
    for name, value in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(value + "\n")
    return tmp_path / "proc" / "cgroup", root


@pytest.mark.parametrize(
    ("membership", "files", "headroom"),
    [
        # v2 inside a container: the mount's root is the container's cgroup.
        ("0::/\n", {"memory.max": str(8 * GiB), "memory.current": str(GiB)}, 7 * GiB),
        # v2 on a host: the pod's limit, on a parent of the container's cgroup, is the tighter.
        (
            "0::/kubepods/pod1/c1\n",
            {
                "kubepods/pod1/c1/memory.max": "max",
                "kubepods/pod1/c1/memory.current": str(GiB),
                "kubepods/pod1/memory.max": str(3 * GiB),
                "kubepods/pod1/memory.current": str(2 * GiB),
            },
            GiB,
        ),
        # v1 in a container without a cgroup namespace: the named path is not mounted, the root is it.
        (
            "5:devices:/docker/abc\n4:memory:/docker/abc\n0::/\n",
            {"memory/memory.limit_in_bytes": str(2 * GiB), "memory/memory.usage_in_bytes": str(GiB // 2)},
            GiB + GiB // 2,
        ),
        # v1 with no limit (the kernel writes about 2**63) and v2 without the memory files: none.
        ("4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712"}, None),
        ("0::/\n", {}, None),
        # Over its limit: no room, not a negative size.
        ("0::/\n", {"memory.max": str(GiB), "memory.current": str(2 * GiB)}, 0),
        # File cache the kernel can drop (a model just read) is room, as the kubelet counts it.
        (
            "0::/\n",
            {
                "memory.max": str(8 * GiB),
                "memory.current": str(7 * GiB),
                "memory.stat": f"anon {GiB}\ninactive_file {5 * GiB}\nactive_file {GiB}",
            },
            6 * GiB,
        ),
        (
            "4:memory:/\n",
            {
                "memory/memory.limit_in_bytes": str(4 * GiB),
                "memory/memory.usage_in_bytes": str(4 * GiB),
                "memory/memory.stat": f"cache {3 * GiB}\ntotal_inactive_file {2 * GiB}",
            },
            2 * GiB,
        ),
    ],
)
def test_the_tightest_cgroup_limit_is_the_headroom(
    tmp_path: Path, membership: str, files: dict[str, str], headroom: int | None
) -> None:
    assert cgroup_headroom(*_layout(tmp_path, membership, files)) == headroom


def test_no_cgroup_file_means_no_limit(tmp_path: Path) -> None:
    assert cgroup_headroom(tmp_path / "missing", tmp_path) is None
