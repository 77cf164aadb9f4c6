"""The OpenAI chat-completions request and reply as ``stillroom serve`` speaks them.

Requests are checked field by field and unknown fields are refused (400), so a client never believes
a parameter took effect when it did not. Accepted:

- honoured: ``model``, ``messages`` (system / user / assistant with ``tool_calls`` / tool with
  ``tool_call_id``; content a string or text parts), ``max_tokens`` (or ``max_completion_tokens``),
  ``temperature``, ``top_p``, ``seed``, ``n`` (1), ``stream`` (false), ``tools``, ``tool_choice``
  (``auto``, ``none``, ``required`` or a named function), ``parallel_tool_calls``, ``response_format``
  (``text``, ``json_object``, ``json_schema``);
- accepted and without effect, because they change nothing in the answer: ``user`` (an end-user id),
  ``presence_penalty`` / ``frequency_penalty`` at 0, a message's ``name``, and on an assistant message
  echoed back by a client the empty ``refusal`` / ``annotations`` / ``audio`` / ``function_call``;
- everything else (``stop``, ``logprobs``, ``logit_bias``, ...) answers 400 naming the field.

``reply(text, ...)`` turns the model's text into the response message: well-formed ``<tool_call>``
blocks become ``message.tool_calls`` (``arguments`` a JSON string) with ``finish_reason: tool_calls``
and ``content`` null when nothing else was said.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from stillroom import toolcalls
from stillroom.http_guard import no_stream

MAX_NEW_TOKENS = 512
MIN_TEMPERATURE = 0.01  # above 0 (greedy), smaller temperatures overflow the softmax
NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names
RESULT = ("<tool_response>", "</tool_response>")  # how tool results reach the model (chat_data.text_messages)
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _json_schema(v: dict) -> dict:
    try:
        jsonschema.Draft202012Validator.check_schema(v)
    except jsonschema.SchemaError as e:
        raise ValueError(f"not a JSON Schema: {e.message}") from None
    return v


class Function(BaseModel):
    model_config = STRICT
    name: str = Field(pattern=NAME)
    description: str = Field("", max_length=8_000)
    parameters: Annotated[dict[str, Any], AfterValidator(_json_schema)] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None  # true: this server constrains the calls to the tools' schemas


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: Function


class CalledFunction(BaseModel):
    model_config = STRICT
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=32_000)  # a JSON object, as a string (OpenAI's format)

    @field_validator("arguments")
    @classmethod
    def _object(cls, v: str) -> str:
        try:
            value = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"must be a JSON object as a string ({e.msg} at char {e.pos})") from None
        if not isinstance(value, dict):
            raise ValueError("must be a JSON object as a string")
        return v


class ToolCall(BaseModel):
    model_config = STRICT
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str = Field(max_length=32_000)


class Message(BaseModel):
    model_config = STRICT
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, max_length=32_000)
    name: str | None = Field(None, max_length=256)  # a participant's name: accepted, not shown to the model
    tool_calls: list[ToolCall] | None = Field(None, max_length=16)  # assistant turns only
    tool_call_id: str | None = Field(None, max_length=256)  # tool turns: the call this result answers
    refusal: None = None  # the openai client echoes an assistant message back with these empty fields
    annotations: list[Any] | None = Field(None, max_length=0)
    audio: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant turns make tool calls (this is a {self.role} turn)")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError(f"only tool turns carry tool_call_id (this is a {self.role} turn)")
        if self.content is None and not self.tool_calls:
            raise ValueError("content is missing (only an assistant turn with tool_calls may leave it out)")
        return self

    def text(self) -> str | None:
        return "".join(p.text for p in self.content) if isinstance(self.content, list) else self.content


class NamedFunction(BaseModel):
    model_config = STRICT
    name: str = Field(max_length=64)


class NamedChoice(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: NamedFunction


class SchemaFormat(BaseModel):
    model_config = STRICT
    name: str = Field("response", pattern=NAME)
    description: str | None = Field(None, max_length=8_000)
    schema_: Annotated[dict[str, Any], AfterValidator(_json_schema)] = Field(alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: SchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is json_schema")
        return self


def _zero(v: float) -> float:
    if v != 0:
        raise ValueError("penalties are not supported: leave it out or send 0")
    return v


class ChatRequest(BaseModel):
    model_config = STRICT
    model: str = Field(max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)  # None: 128
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)  # newer clients' name for max_tokens
    temperature: float = Field(0.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1)  # one choice per request
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: Annotated[bool, AfterValidator(no_stream)] = False
    tools: list[Tool] | None = Field(None, max_length=64)
    tool_choice: Literal["auto", "none", "required"] | NamedChoice | None = None
    parallel_tool_calls: bool = True  # false: one call at most (enforced when the calls are constrained)
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, max_length=256)
    presence_penalty: Annotated[float, AfterValidator(_zero)] = 0.0
    frequency_penalty: Annotated[float, AfterValidator(_zero)] = 0.0

    @field_validator("temperature")
    @classmethod
    def _not_vanishing(cls, v: float) -> float:
        if 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or between {MIN_TEMPERATURE} and 2")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ChatRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree: send one of them")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: a function name is offered twice")
        if self.tool_choice not in (None, "auto", "none") and not names:
            raise ValueError("tool_choice asks for a tool call, but no tools are offered")
        if isinstance(self.tool_choice, NamedChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools ({', '.join(names)})")
        if names and self.choice != "none" and self.response_format is not None and self.response_format.type != "text":
            raise ValueError("response_format json with tools is not supported: send tool_choice none, or drop one of them")
        called = set()
        for i, m in enumerate(self.messages):
            called |= {c.id for c in m.tool_calls or []}
            if m.tool_call_id is not None and m.tool_call_id not in called:
                raise ValueError(f"messages[{i}].tool_call_id {m.tool_call_id!r} answers no tool call made before it")
        return self

    @property
    def new_tokens(self) -> int:
        return self.max_tokens or self.max_completion_tokens or 128

    @property
    def choice(self) -> str:
        """``auto`` (the default with tools), ``none``, ``required``, or ``function`` (a named one)."""
        if isinstance(self.tool_choice, NamedChoice):
            return "function"
        return self.tool_choice or "auto"

    def offered(self) -> list[dict]:
        """The tools as the task renders them (OpenAI format, without ``strict``)."""
        return [{"type": "function", "function": t.function.model_dump(include={"name", "description", "parameters"})} for t in self.tools or []]

    def conversation(self) -> list[dict]:
        """The messages as plain dicts: ``content`` text (or None), calls as ``{"name", "arguments": {...}}``,
        a tool result's text without a ``<tool_response>`` wrapper (the task's rendering adds it)."""
        out = []
        for m in self.messages:
            msg: dict = {"role": m.role, "content": m.text()}
            if m.role == "tool" and msg["content"].startswith(RESULT[0]) and msg["content"].endswith(RESULT[1]):
                msg["content"] = msg["content"][len(RESULT[0]) : -len(RESULT[1])]  # a client that wrote our format: wrapped once, not twice
            if m.tool_calls:
                msg["tool_calls"] = [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in m.tool_calls]
            out.append(msg)
        return out

    def constraint(self) -> dict | None:
        """What the answer is held to: a JSON response format; the tools when the choice requires a
        call, names one, forbids calls, or a tool is marked ``strict``; else None (free)."""
        from stillroom import constrained

        rf = self.response_format
        if rf is not None and rf.type == "json_schema":
            return {"type": "json_schema", "schema": rf.json_schema.schema_}
        if rf is not None and rf.type == "json_object":
            return {"type": "json_object"}
        if not self.tools:
            return None
        strict = any(t.function.strict for t in self.tools)
        if self.choice == "function":
            return constrained.for_tools(self.offered(), name=self.tool_choice.function.name, parallel=self.parallel_tool_calls)
        if self.choice in ("required", "none") or strict:
            return constrained.for_tools(self.offered(), self.choice, parallel=self.parallel_tool_calls)
        return None


def reply(text: str, finished: bool, tools_offered: bool, choice: str) -> tuple[dict, str]:
    """The response message and finish reason for the model's ``text``. With tools offered (and a
    choice other than ``none``), well-formed calls become ``tool_calls``; output with a malformed call
    block is returned as text, as it was written. With ``none``, call blocks are dropped from the text."""
    if not tools_offered:
        return {"role": "assistant", "content": text}, "stop" if finished else "length"
    parsed = toolcalls.parse(text)
    if choice == "none":
        return {"role": "assistant", "content": parsed.text}, "stop" if finished else "length"
    if parsed.errors or not parsed.calls:
        return {"role": "assistant", "content": text}, "stop" if finished else "length"
    calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
              "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}} for c in parsed.calls]  # fmt: skip
    return {"role": "assistant", "content": parsed.text or None, "tool_calls": calls}, "tool_calls" if finished else "length"


def as_text(message: dict) -> str:
    """A response message back as the model wrote it (content, then one ``<tool_call>`` block per call):
    what a client replays into the conversation, and what a task's check reads."""
    calls = "".join(toolcalls.format_call({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])})
                    for c in message.get("tool_calls") or [])  # fmt: skip
    return (message.get("content") or "") + calls
