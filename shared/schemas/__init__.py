"""Request and response models shared by the front and the workers, imported from here. By topic:
a conversation's turns and the tools it may call (``messages``), the engine features a request may
need (``engine_features``), the job API's request (``job_request``), what a worker runs
(``generation_request``), and what the API shows of a job (``job_views``)."""

from shared.schemas.engine_features import (
    ENGINE_FEATURES,
    LOGIT_BIAS,
    LOGPROBS,
    PENALTIES,
    PROMPT_LOGPROBS,
    RAW_PROMPT,
    STRICT_CALLS,
    STRUCTURED_OUTPUT,
    TOOLS,
)
from shared.schemas.generation_request import GenerationRequest, PromptInput
from shared.schemas.job_request import JobRequest, JsonSchemaFormat, ResponseFormat, SamplingFields
from shared.schemas.job_views import DoneEvent, JobError, JobView, StreamEvent, Timings, Usage
from shared.schemas.messages import (
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    Text,
    ToolCall,
    ToolDefinition,
)

__all__ = [
    "ENGINE_FEATURES",
    "LOGIT_BIAS",
    "LOGPROBS",
    "PENALTIES",
    "PROMPT_LOGPROBS",
    "RAW_PROMPT",
    "STRICT_CALLS",
    "STRUCTURED_OUTPUT",
    "TOOLS",
    "ChatMessage",
    "DoneEvent",
    "FunctionCall",
    "FunctionDefinition",
    "GenerationRequest",
    "JobError",
    "JobRequest",
    "JobView",
    "JsonSchemaFormat",
    "PromptInput",
    "ResponseFormat",
    "SamplingFields",
    "StreamEvent",
    "Text",
    "Timings",
    "ToolCall",
    "ToolDefinition",
    "Usage",
]
