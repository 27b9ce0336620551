"""The vLLM tests' reference: vLLM run alone, offline, in the test process, with the sampling the
worker's jobs ask for."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shared.schemas import ChatMessage, PromptInput
from tests.vllm_stack import MAX_LEN


class Reference:
    """vLLM alone, offline, in this process: what each prompt should give."""

    def __init__(self, model_dir: Path) -> None:
        from vllm import LLM

        from worker.chat_prompt import ChatPrompt

        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

        self.llm = LLM(
            model=str(model_dir),
            dtype="float32",
            enforce_eager=True,
            kv_cache_memory_bytes=2**28,
            max_model_len=MAX_LEN,
            max_num_seqs=4,
        )
        self.prompt = ChatPrompt()
        self.prompt.tokenizer = self.llm.get_tokenizer()
        self.prompt.eos_ids = {int(self.prompt.tokenizer.convert_tokens_to_ids("<|im_end|>"))}
        self.prompt.context_length = MAX_LEN

    def ids(self, prompt: str) -> list[int]:
        return self.prompt.encode(PromptInput(messages=[ChatMessage(role="user", content=prompt)]))

    def generate(self, ids: list[int], max_tokens: int, **sampling: Any) -> Any:
        """vLLM's RequestOutput for the prompt ``ids`` (greedy unless ``sampling`` says)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, **{"temperature": 0.0, **sampling})
        return self.llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]

    def text(self, token_ids: list[int]) -> str:
        # The tokens' text as a whole (vLLM's own text drops a character cut at the end).
        return str(self.prompt.tokenizer.decode(token_ids, skip_special_tokens=True))

    def special(self) -> set[str]:
        """The special tokens, which the answer's text leaves out."""
        added = self.prompt.tokenizer.added_tokens_decoder.values()
        return {str(token.content) for token in added if token.special}

    def answer(self, prompt: str, max_tokens: int, **sampling: Any) -> str:
        return self.text(self.generate(self.ids(prompt), max_tokens, **sampling).outputs[0].token_ids)


def logprob_rows(model_dir: Path) -> Any:
    """Log probabilities of every next token at every place of a sequence of ids (a function of
    the ids), from a full transformers forward pass of the same weights (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def rows(ids: list[int]) -> Any:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return rows
