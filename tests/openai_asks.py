"""Chat requests on the end-to-end stack's model for the OpenAI-fidelity tests: a plain ask and a
weather tool (with its arguments as a pydantic model)."""

from __future__ import annotations

from typing import Any

from openai.types.chat import ChatCompletionToolParam
from pydantic import BaseModel, Field

from tests.conftest import Stack

WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


class Weather(BaseModel):
    city: str = Field(max_length=10)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


def ask(stack: Stack, content: str, max_tokens: int = 80) -> dict[str, Any]:
    return {
        "model": stack.model_dir.name,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
