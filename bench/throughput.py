"""Engine throughput: streamq against plain transformers, in-process and over HTTP.

For each model (the tiny demo model, and a random model with Qwen2.5-0.5B's shape), c clients
that all arrive at t=0, each asking for N new tokens (greedy, the same prompts everywhere,
prompts checked to run N tokens without an early end of sequence):

(a) transformers ``model.generate`` (KV cache), one request after another in one process: the
    one-at-a-time server; request i's TTFT includes the wait for requests before it;
(b) streamq's engine in-process: ``Engine(BatchedCausalLM(slots=c))``, all c jobs at t=0;
(c) streamq's full stack: private Redis + one front + one worker (16 slots), c HTTP clients
    (POST /v1/jobs, then the job's SSE stream), default settings: a job's first token is
    published at once, later ones coalesced into at most one event per 40 ms;
(d) ``transformers serve --continuous-batching`` on the same folder, c streaming clients on
    /v1/chat/completions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import ROOT
from bench.measure import Cell, ms
from bench.stack import hf_cell, hf_server, streamq_cell, streamq_stack

SYSTEMS = {
    "a": "(a) transformers generate, one at a time",
    "b": "(b) streamq engine, in-process",
    "c": "(c) streamq full stack over HTTP",
    "d": "(d) transformers serve --continuous-batching",
}
CONCURRENCY = {"a": (1, 4, 16), "b": (1, 4, 8, 16), "c": (1, 4, 8, 16), "d": (1, 4, 8, 16)}
PROMPT_TOKENS_BOUND = 64  # the chosen prompts are far shorter; sizes transformers serve's KV cache
SUBPROCESS_TIMEOUT = 3600


@dataclass
class ModelResults:
    shape: str
    cells: dict[tuple[str, int], Cell] = field(default_factory=dict)
    note: str = ""

    def get(self, system: str, c: int) -> Cell | None:
        cell = self.cells.get((system, c))
        return cell if cell is not None and not cell.error and cell.requests else None


def _cell_subprocess(what: str, model_dir: Path, tokens: int, extra: list[str]) -> str:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.cell",
            what,
            "--model",
            str(model_dir),
            "--tokens",
            str(tokens),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bench.cell {what} failed: {tail}")
    return proc.stdout.strip().splitlines()[-1]


def _guard(results: ModelResults, system: str, c: int, run: object) -> None:
    try:
        results.cells[(system, c)] = run()  # type: ignore[operator]
    except Exception as exc:
        results.cells[(system, c)] = Cell(error=f"{type(exc).__name__}: {exc}")
    cell = results.cells[(system, c)]
    status = cell.error or f"{cell.tokens_per_s:.0f} tok/s"
    print(f"  {results.shape} {system} c={c}: {status}", file=sys.stderr, flush=True)


def run_model(
    shape: str, model_dir: Path, workdir: Path, tokens: int, systems: str, threads: int = 2
) -> ModelResults:
    results = ModelResults(shape)
    top = max(max(CONCURRENCY[s]) for s in systems)
    threads_arg = ["--threads", str(threads)]
    prompts: list[str] = json.loads(
        _cell_subprocess("prompts", model_dir, tokens, ["--count", str(top), *threads_arg])
    )
    for system in "ab":
        if system not in systems:
            continue
        for c in CONCURRENCY[system]:
            args = ["--prompts", json.dumps(prompts[:c]), *threads_arg]
            what = "generate" if system == "a" else "engine"
            _guard(
                results,
                system,
                c,
                lambda what=what, args=args: Cell.from_json(
                    json.loads(_cell_subprocess(what, model_dir, tokens, args))
                ),
            )
    if "c" in systems:
        try:
            with streamq_stack(model_dir, workdir, threads=threads) as (port, pid):
                for c in CONCURRENCY["c"]:
                    _guard(results, "c", c, lambda c=c: streamq_cell(port, pid, prompts[:c], tokens))
                    if results.cells[("c", c)].error:
                        break  # the stack is not serving: the rest would only wait for it
        except Exception as exc:
            for c in CONCURRENCY["c"]:
                results.cells.setdefault(("c", c), Cell(error=f"the stack did not start: {exc}"))
    if "d" in systems:
        top_d = max(CONCURRENCY["d"])
        try:
            with hf_server(model_dir, workdir, top_d, tokens, PROMPT_TOKENS_BOUND, threads) as (port, pid):
                for c in CONCURRENCY["d"]:
                    _guard(
                        results, "d", c, lambda c=c: hf_cell(port, pid, str(model_dir), prompts[:c], tokens)
                    )
                    if results.cells[("d", c)].error:
                        break
        except Exception as exc:
            for c in CONCURRENCY["d"]:
                results.cells.setdefault(("d", c), Cell(error=f"transformers serve did not start: {exc}"))
    return results


def _ratio(num: float, den: float) -> str:
    return "n/a" if num != num or den != den or den == 0 else f"{num / den:.2f}x"


def _verdict(value: float, ok: bool) -> str:
    return "n/a" if value != value else ("met" if ok else "MISSED")


def print_table(all_results: list[ModelResults], tokens: int, threads: int = 2) -> None:
    head = (
        f"{'model':<14}{'system':<46}{'c':>3}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p95':>10}"
        f"{'ITL p50':>9}{'peak RSS':>10}"
    )
    what = f"{tokens} new tokens per request, greedy, torch on {threads} threads, CPU, fp32"
    print(f"\nengine throughput — {what}")
    print(f"{'':<63}{'(ms)':>10}{'(ms)':>10}{'(ms)':>9}{'(MiB)':>10}")
    print(head)
    for results in all_results:
        for system in "abcd":
            for c in CONCURRENCY[system]:
                cell = results.cells.get((system, c))
                if cell is None:
                    continue
                label = f"{results.shape:<14}{SYSTEMS[system]:<46}{c:>3}"
                if cell.error or not cell.requests:
                    print(f"{label}  n/a: {cell.error or 'no output'}")
                    continue
                print(
                    f"{label}{cell.tokens_per_s:>9.1f}{ms(cell.ttft(0.5)):>10}{ms(cell.ttft(0.95)):>10}"
                    f"{ms(cell.itl):>9}{cell.rss_mib:>10.0f}"
                )
    print(
        "notes: tok/s = all tokens / (t=0 → last token); TTFT from t=0 (all clients arrive at once);\n"
        "       ITL = per request (last − first token) / (tokens − 1), median over requests;\n"
        "       (a)/(b) peak RSS: ru_maxrss of a fresh process per cell; (c): the worker's VmHWM,\n"
        "       (d): the transformers serve process's VmHWM (both reset before each cell);\n"
        "       (c) runs with default settings: tokens after the first are coalesced, one event per 40 ms;\n"
        "       (c) and (d) times are client receipt times; (d)'s KV cache is bounded with --cb-num-blocks."
    )
    print_ratios(all_results)


def print_ratios(all_results: list[ModelResults]) -> None:
    nan = float("nan")
    print(f"\n{'target':<62}{'value':>10}{'target':>10}{'':>3}{'verdict':<8}")

    def row(name: str, value: str, target: str, verdict: str) -> None:
        print(f"{name:<62}{value:>10}{target:>10}   {verdict:<8}")

    for results in all_results:
        a, b = results.get("a", 16), results.get("b", 16)
        if results.shape == "tiny":
            value = b.tokens_per_s / a.tokens_per_s if a and b else nan
            row(
                f"{results.shape}: (b)/(a) tok/s at c=16",
                _ratio(value, 1.0),
                "≥ 5x",
                _verdict(value, value >= 5),
            )
        for c in CONCURRENCY["c"]:
            bc, cc = results.get("b", c), results.get("c", c)
            value = cc.tokens_per_s / bc.tokens_per_s if bc and cc else nan
            row(
                f"{results.shape}: (c)/(b) tok/s at c={c}",
                _ratio(value, 1.0),
                "≥ 0.9x",
                _verdict(value, value >= 0.9),
            )
            over = cc.ttft(0.5) - bc.ttft(0.5) if bc and cc else nan
            row(
                f"{results.shape}: (c)−(b) TTFT p50 at c={c} (ms)",
                ms(over),
                "≤ 5",
                _verdict(over, over <= 0.005),
            )
        cc, dd = results.get("c", 8), results.get("d", 8)
        value = cc.tokens_per_s / dd.tokens_per_s if cc and dd else nan
        row(
            f"{results.shape}: (c)/(d) tok/s at c=8",
            _ratio(value, 1.0),
            "≥ 1.2x",
            _verdict(value, value >= 1.2),
        )
        cd = f"{ms(cc.ttft(0.5))}/{ms(dd.ttft(0.5))}" if cc and dd else "n/a"
        diff = cc.ttft(0.5) - dd.ttft(0.5) if cc and dd else nan
        row(f"{results.shape}: TTFT p50 (c)/(d) at c=8 (ms)", cd, "(c) ≤ (d)", _verdict(diff, diff <= 0))


def run_throughput(
    workdir: Path, tokens: int, shapes: list[str], systems: str = "abcd", threads: int = 2
) -> None:
    from worker.tiny_model import make_tiny_model

    all_results = []
    for shape in shapes:
        model_dir = workdir / f"streamq-{shape}"
        print(f"throughput: {shape} model …", file=sys.stderr, flush=True)
        make_tiny_model(model_dir, shape=shape)
        all_results.append(run_model(shape, model_dir, workdir, tokens, systems, threads))
    print_table(all_results, tokens, threads)
