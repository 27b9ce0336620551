"""How a model writes a tool call in its answer: Hermes' format, the one streamq reads calls in
(api.tool_calls) and holds strict calls to (api.strict_tools), on both engines."""

OPEN, CLOSE = "<tool_call>", "</tool_call>"
