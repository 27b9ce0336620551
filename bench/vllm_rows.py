"""The vLLM engine against vLLM alone (issue 13): ``python -m bench --only vllm``.

On one model folder (a random model with Qwen2.5-0.5B's shape), in fp32 and in bf16, c streaming
clients that all arrive at t=0, each asking for N new tokens (greedy, the same prompts):

(c) streamq's full stack on its transformers engine (fp32 only: the baseline the issue names);
(e) streamq's full stack over HTTP with ``--engine vllm`` (private Redis, one front, one worker);
(f) vLLM's own OpenAI server alone on the same folder, the same vLLM settings, c streaming
    clients on /v1/chat/completions.

Both vLLM runs get the same KV cache, the same max_model_len and the same CPU thread binding.
(e) and (f) are up at once and their cells run in turns (e, f, e, f, ...), so that the
machine's drift (tens of percent within minutes on these shared cores) falls on both alike; an
idle vLLM engine sleeps once its shared-memory readers have spun for a second, so each cell
starts after a pause (SETTLE) and the one not measured then takes no CPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.measure import Cell, RepeatedCell, ms
from bench.stack import HOST, hf_cell, http_server, streamq_cell, streamq_stack
from bench.throughput import _cell_subprocess, _ratio, _verdict
from streamq.processes import free_port

CONCURRENCY = (1, 4, 16, 64)
REPEATS = 3  # runs of each cell
# Seconds between cells: vLLM's shared-memory readers (the engine's, and its executor's) spin for
# 1 s after their last message (shm_broadcast's busy loop) before they sleep, so a system just
# measured would still take CPU from the next one's first second.
SETTLE = 1.5
DTYPES = ("float32", "bfloat16")
KV_CACHE_GIB = 2
MAX_MODEL_LEN = 1024
SYSTEMS = {
    "c": "(c) streamq, transformers engine",
    "e": "(e) streamq --engine vllm",
    "f": "(f) vLLM OpenAI server alone",
}


def _cpu_bind() -> str:
    return ",".join(map(str, sorted(os.sched_getaffinity(0))))


def vllm_env(dtype: str) -> dict[str, str]:
    """The streamq worker's settings for row (e), matching (f)'s command line."""
    return {
        "STREAMQ_ENGINE": "vllm",
        "STREAMQ_DTYPE": dtype,
        "STREAMQ_KV_CACHE_GIB": str(KV_CACHE_GIB),
        "STREAMQ_MAX_SEQ_LEN": str(MAX_MODEL_LEN),
        "VLLM_CPU_OMP_THREADS_BIND": _cpu_bind(),
        "VLLM_HOST_IP": HOST,
    }


@contextlib.contextmanager
def vllm_server(model_dir: Path, workdir: Path, dtype: str, max_seqs: int) -> Iterator[tuple[int, int]]:
    """vLLM's OpenAI server (the one `vllm serve` runs; its module entry point, since the CLI's
    version lookup fails for the `vllm-cpu` distribution); yields (port, pid)."""
    port = free_port()
    log_path = workdir / f"vllm-serve-{model_dir.name}-{dtype}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **vllm_env(dtype)}
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--dtype",
        dtype,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-num-seqs",
        str(max_seqs),
        "--kv-cache-memory-bytes",
        str(KV_CACHE_GIB * 2**30),
        "--host",
        HOST,
        "--port",
        str(port),
        "--disable-log-stats",
    ]
    with http_server(command, env, port, log_path, "vLLM's server", 900) as pid:
        yield port, pid


@dataclass
class Results:
    cells: dict[tuple[str, str, int], Cell] = field(default_factory=dict)

    def get(self, system: str, dtype: str, c: int) -> Cell | None:
        cell = self.cells.get((system, dtype, c))
        return cell if cell is not None and not cell.error and cell.requests else None


def _guard(results: Results, key: tuple[str, str, int], run: object) -> None:
    try:
        results.cells[key] = run()  # type: ignore[operator]
    except Exception as exc:
        results.cells[key] = Cell(error=f"{type(exc).__name__}: {exc}")
    cell = results.cells[key]
    print(f"  vllm {key}: {cell.error or f'{cell.tokens_per_s:.0f} tok/s'}", file=sys.stderr, flush=True)


def _alternated(
    results: Results, dtype: str, c: int, runs: dict[str, Callable[[list[str]], Cell]], prompts: list[str]
) -> None:
    """Cells of each system at c clients, run in turns (e, f, e, f, ...): the machine's load drifts
    by tens of percent within minutes, and turns give both systems the same drift. Each cell is
    run REPEATS times (one run's TTFT at c=16 is one burst's: it moved by ±30% between runs), after
    a pause of SETTLE seconds."""
    done: dict[str, list[Cell]] = {system: [] for system in runs}
    for _ in range(REPEATS):
        for system, run in runs.items():
            time.sleep(SETTLE)
            try:
                done[system].append(run(prompts[:c]))
            except Exception as exc:
                done[system].append(Cell(error=f"{type(exc).__name__}: {exc}"))
    for system, cells in done.items():
        good = [cell for cell in cells if not cell.error and cell.requests]
        cell = (RepeatedCell.of(good) if len(good) > 1 else good[0]) if good else cells[0]
        results.cells[(system, dtype, c)] = cell
        shown = cell.error or f"{cell.tokens_per_s:.0f} tok/s"
        print(f"  vllm {(system, dtype, c)}: {shown}", file=sys.stderr, flush=True)


def run_rows(
    model_dir: Path, workdir: Path, tokens: int, systems: str, dtypes: tuple[str, ...] = DTYPES
) -> Results:
    """(e) and (f) are both up at once (one dtype at a time) and measured in turns, cell by cell."""
    results = Results()
    prompts: list[str] = json.loads(
        _cell_subprocess("prompts", model_dir, tokens, ["--count", str(max(CONCURRENCY))])
    )
    slots = max(CONCURRENCY)
    for dtype in dtypes:
        with contextlib.ExitStack() as up:
            runs: dict[str, Callable[[list[str]], Cell]] = {}
            try:
                if "e" in systems:
                    env = {**vllm_env(dtype), "STREAMQ_SLOTS": str(slots)}
                    port_e, pid_e = up.enter_context(
                        streamq_stack(model_dir, workdir, env, slots=slots, start_timeout=900)
                    )
                    runs["e"] = functools.partial(streamq_cell, port_e, pid_e, tokens=tokens)
                if "f" in systems:
                    port_f, pid_f = up.enter_context(vllm_server(model_dir, workdir, dtype, slots))
                    runs["f"] = functools.partial(hf_cell, port_f, pid_f, str(model_dir), tokens=tokens)
            except Exception as exc:
                for system in "ef":
                    for c in CONCURRENCY:
                        key = (system, dtype, c)
                        results.cells.setdefault(key, Cell(error=f"a server did not start: {exc}"))
                continue
            for c in CONCURRENCY:
                _alternated(results, dtype, c, runs, prompts)
    if "c" in systems:
        with streamq_stack(model_dir, workdir, {"STREAMQ_DTYPE": "float32"}) as (port, pid):  # 16 slots
            for c in (16,):
                _guard(results, ("c", "float32", c), lambda c=c: streamq_cell(port, pid, prompts[:c], tokens))
    return results


def print_table(results: Results, shape: str, tokens: int) -> None:
    cores = os.cpu_count()
    print(f"\nvLLM engine — {shape} shape, {tokens} new tokens per request, greedy, CPU ({cores} cores)")
    head = f"{'system':<40}{'dtype':<10}{'c':>3}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p95':>10}"
    print(f"{head}{'ITL p50':>9}{'RSS':>8}")
    print(f"{'':<53}{'':>9}{'(ms)':>10}{'(ms)':>10}{'(ms)':>9}{'(MiB)':>8}")
    for (system, dtype, c), cell in sorted(results.cells.items()):
        label = f"{SYSTEMS[system]:<40}{dtype:<10}{c:>3}"
        if cell.error or not cell.requests:
            print(f"{label}  n/a: {cell.error or 'no output'}")
            continue
        print(
            f"{label}{cell.tokens_per_s:>9.1f}{ms(cell.ttft(0.5)):>10}{ms(cell.ttft(0.95)):>10}"
            f"{ms(cell.itl):>9}{cell.rss_mib:>8.0f}"
        )
    print(
        "notes: RSS is the worker's (e) or the server's (f) VmHWM; vLLM's engine-core process is not in it;"
    )
    print(
        f"       each cell ran {REPEATS} times in turns: tok/s is the median run's; TTFT, ITL: all requests"
    )
    nan = float("nan")
    print(f"\n{'target':<50}{'value':>10}{'target':>10}   verdict")

    def row(name: str, value: str, target: str, verdict: str) -> None:
        print(f"{name:<50}{value:>10}{target:>10}   {verdict}")

    for dtype in DTYPES:
        for c in CONCURRENCY:
            e, f = results.get("e", dtype, c), results.get("f", dtype, c)
            value = e.tokens_per_s / f.tokens_per_s if e and f else nan
            row(f"(e)/(f) tok/s, {dtype}, c={c}", _ratio(value, 1), "≥ 0.95x", _verdict(value, value >= 0.95))
            if c in (1, 16):
                over = e.ttft(0.5) - f.ttft(0.5) if e and f else nan
                if c == 1:
                    shown, target, ok = ms(over), "≤ 10 ms", over <= 0.010
                else:
                    rel = over / f.ttft(0.5) if e and f else nan
                    shown, target, ok = (f"{rel * 100:.1f}%" if rel == rel else "n/a"), "≤ 5%", rel <= 0.05
                row(f"(e)−(f) TTFT p50, {dtype}, c={c}", shown, target, _verdict(over, ok))
    e, c16 = results.get("e", "float32", 16), results.get("c", "float32", 16)
    value = e.tokens_per_s / c16.tokens_per_s if e and c16 else nan
    row("(e)/(c) tok/s, float32, c=16", _ratio(value, 1), "≥ 2.5x", _verdict(value, value >= 2.5))


def run_vllm(
    workdir: Path, tokens: int, shape: str, systems: str = "cef", dtypes: tuple[str, ...] = DTYPES
) -> None:
    from worker.tiny_model import make_tiny_model

    model_dir = workdir / f"streamq-{shape}"
    make_tiny_model(model_dir, shape=shape)
    print_table(run_rows(model_dir, workdir, tokens, systems, dtypes), shape, tokens)
