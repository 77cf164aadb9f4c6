"""Tool calls in model output: parse them, check them against the tools' schemas, compare them.

The output format stillroom teaches is one ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
block per call (a JSON list inside one block is accepted too); anything else is a plain answer.
Pure functions, no model code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import jsonschema

CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class Parsed:
    calls: list[dict]  # [{"name": str, "arguments": dict}], well-formed ones only
    errors: list[str]  # why a block was not a well-formed call
    text: str  # the output with the call blocks removed, stripped

    @property
    def has_call_attempt(self) -> bool:
        return bool(self.calls or self.errors)


def parse(output: str) -> Parsed:
    calls, errors = [], []
    for block in CALL_RE.findall(output):
        try:
            obj = json.loads(block.strip())
        except json.JSONDecodeError as e:
            errors.append(f"call is not valid JSON ({e.msg} at char {e.pos})")
            continue
        for item in obj if isinstance(obj, list) else [obj]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                errors.append("call has no string `name`")
            elif not isinstance(item.get("arguments", {}), dict):
                errors.append(f"call {item['name']!r}: `arguments` is not an object")
            else:
                calls.append({"name": item["name"], "arguments": item.get("arguments", {})})
    text = CALL_RE.sub("", output).strip()
    return Parsed(calls, errors, text)


def schema_problems(call: dict, tools: list[dict]) -> list[str]:
    """Why ``call`` is not a valid call of one of ``tools`` (OpenAI tools format); [] when valid."""
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    fn = by_name.get(call["name"])
    if fn is None:
        return [f"unknown function {call['name']!r} (offered: {', '.join(sorted(by_name))})"]
    params = fn.get("parameters", {"type": "object", "properties": {}})
    schema = {**params, "additionalProperties": False}
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{call['name']}: {e.message}" for e in sorted(validator.iter_errors(call["arguments"]), key=str)]


def _same_value(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, str) and isinstance(b, str):
        return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()
    return a == b


def same_call(got: dict, want: dict) -> bool:
    """Same function and the same arguments (strings compared case- and space-insensitively)."""
    ga, wa = got.get("arguments", {}), want.get("arguments", {})
    return got["name"] == want["name"] and set(ga) == set(wa) and all(_same_value(ga[k], wa[k]) for k in wa)


def format_call(call: dict) -> str:
    return "<tool_call>" + json.dumps(call, ensure_ascii=False) + "</tool_call>"
