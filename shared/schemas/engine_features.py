"""The engine features a request may need: what some engines can do and others cannot."""

# What some engines can do and others cannot: a request that needs one goes only to workers
# whose engine offers it (the front refuses it with a 400 naming the field otherwise).
PENALTIES = "penalties"
LOGIT_BIAS = "logit_bias"
STRUCTURED_OUTPUT = "structured_output"
LOGPROBS = "logprobs"  # log probabilities of the answer's tokens (and the most likely others)
PROMPT_LOGPROBS = "prompt_logprobs"  # ... and of the prompt's tokens
RAW_PROMPT = "raw_prompt"  # a prompt given to the model as is (text or token ids), no chat template
TOOLS = "tools"  # the chat template takes tool definitions, and calls come back as <tool_call>
# Strict functions' calls held by a structural tag (api.strict_tools): its own name, so that a
# worker from before it (which would drop the tag, and run the job unheld) is never sent one.
STRICT_CALLS = "strict_calls"
ENGINE_FEATURES = frozenset(
    {PENALTIES, LOGIT_BIAS, STRUCTURED_OUTPUT, LOGPROBS, PROMPT_LOGPROBS, RAW_PROMPT, TOOLS, STRICT_CALLS}
)
