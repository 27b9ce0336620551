import json, sys
from pathlib import Path
from bench.stack import streamq_cell, streamq_stack
from bench.vllm_rows import vllm_env
from bench.throughput import _cell_subprocess
model = Path(sys.argv[1]); workdir = Path(sys.argv[2]); mp = sys.argv[3]
prompts = [f"keep talking {i}" for i in range(4)]
env = {**vllm_env("float32"), "STREAMQ_SLOTS": "16", "VLLM_ENABLE_V1_MULTIPROCESSING": mp}
with streamq_stack(model, workdir, env, slots=16, start_timeout=900) as (port, pid):
    for c in (1, 4):
        cell = streamq_cell(port, pid, prompts[:c], 128)
        print(f"mp={mp} c={c}: {cell.tokens_per_s:.1f} tok/s ttft p50 {cell.ttft(0.5)*1000:.0f} ms", flush=True)
