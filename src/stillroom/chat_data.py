"""Chat rows from files: read them, name every malformed row, turn the good ones into examples.

A row is one conversation in the OpenAI chat format (a JSON line, or a Parquet row):

- ``messages``: system / user / assistant / tool turns; an assistant turn may carry ``tool_calls``
  (``{"function": {"name", "arguments"}}``, arguments a JSON string or an object);
- ``tools`` (optional): function schemas, ``{"type": "function", "function": {"name", "description",
  "parameters"}}`` (the bare ``function`` object is accepted too; ``parameters`` a JSON string or object);
- ``reference`` (optional, alias ``reference_answer``): the right answer, as text, an assistant message
  or a list of tool calls; without one, a trailing assistant turn is the reference;
- ``id`` (optional; default a hash of the conversation), ``layer`` (core, failure or long_tail; default
  core), ``slice`` (a tag for per-slice evaluation; default ``default``); every other column is kept as
  free metadata (``meta``).

``data.fields`` maps other column names onto these. A malformed row is reported as
``file:line: field: what is wrong`` (Parquet: the row number), one problem per row. No torch here:
``stillroom validate`` reads the files through this module before any model loads.

Models see tool calls as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks and tool
results as ``<tool_response>...</tool_response>`` turns, on every backend (see ``text_messages``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from stillroom import toolcalls

ROLES = ("system", "user", "assistant", "tool")
LAYERS = ("core", "failure", "long_tail")
FIELDS = ("messages", "tools", "reference", "id", "layer", "slice")
DEFAULT_SLICE = "default"
TOOLS_INSTRUCTION = (
    "You can call these tools. To call one, reply with only "
    '<tool_call>{"name": ..., "arguments": {...}}</tool_call>; tool results come back as <tool_response> turns.\nTools:'
)


@dataclass(frozen=True)
class BadRow:
    file: str
    line: int
    field: str
    what: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.what}"


class RowError(ValueError):
    def __init__(self, field: str, what: str):
        super().__init__(what)
        self.field, self.what = field, what


# -- reading ------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line, row) for every row of a JSONL or Parquet file; a JSON line that does not parse comes
    back as a ``BadRow``. Blank lines are skipped."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield i + 1, row
        return
    if path.suffix not in (".jsonl", ".ndjson", ".json"):
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; give JSON lines (.jsonl) or Parquet (.parquet)")
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, BadRow(str(path), i, "(row)", f"not JSON: {e.msg} at column {e.colno}")


# -- one row --------------------------------------------------------------------------------------


def _json_value(value, field: str):
    """A JSON string parsed, anything else as is."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(field, f"not valid JSON: {e.msg} at char {e.pos}") from None
    return value


def _drop_nulls(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}  # Parquet structs carry every field, unused ones null


def normalize_tools(raw, field: str = "tools") -> list[dict]:
    raw = _json_value(raw, field)
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise RowError(field, "must be a list of function schemas")
    out, seen = [], set()
    for i, t in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(t, dict):
            raise RowError(where, "must be an object")
        fn = _drop_nulls(t.get("function", t) if isinstance(t.get("function", t), dict) else {})
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"{where}.function.name", "missing: every tool needs a function name")
        if fn["name"] in seen:
            raise RowError(f"{where}.function.name", f"{fn['name']!r} is declared twice")
        seen.add(fn["name"])
        params = _json_value(fn.get("parameters", {"type": "object", "properties": {}}), f"{where}.function.parameters")
        if not isinstance(params, dict):
            raise RowError(f"{where}.function.parameters", "must be a JSON Schema object")
        try:
            jsonschema.Draft202012Validator.check_schema(params)
        except jsonschema.SchemaError as e:
            raise RowError(f"{where}.function.parameters", f"not a JSON Schema: {e.message}") from None
        spec = {"name": fn["name"], "description": str(fn.get("description") or ""), "parameters": params}
        out.append({"type": "function", "function": spec})
    return out


def normalize_calls(raw, field: str, declared: set[str] | None) -> list[dict]:
    """Tool calls as ``[{"name", "arguments": {...}}]``; ``declared``: the row's function names."""
    if not isinstance(raw, list):
        raise RowError(field, "must be a list of tool calls")
    calls = []
    for j, c in enumerate(raw):
        where = f"{field}[{j}]"
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"{where}.function.name", "missing: a tool call needs a function name")
        args = _json_value(fn.get("arguments") if fn.get("arguments") is not None else {}, f"{where}.function.arguments")
        if not isinstance(args, dict):
            raise RowError(f"{where}.function.arguments", "must be a JSON object")
        if declared is not None and fn["name"] not in declared:
            offered = ", ".join(sorted(declared)) or "no tools declared"
            raise RowError(f"{where}.function.name", f"call to undeclared function {fn['name']!r} ({offered})")
        calls.append({"name": fn["name"], "arguments": args})
    return calls


def _content(value, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: keep the text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            raise RowError(field, "content parts must all be {type: text, text: ...}")
        return "".join(p["text"] for p in value)
    raise RowError(field, f"must be a string (got {type(value).__name__})")


def normalize_message(raw, field: str, declared: set[str]) -> dict:
    if not isinstance(raw, dict):
        raise RowError(field, "must be an object with `role` and `content`")
    raw = _drop_nulls(raw)
    role = raw.get("role")
    if role not in ROLES:
        raise RowError(f"{field}.role", f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
    content = _content(raw.get("content"), f"{field}.content")
    msg: dict = {"role": role, "content": content}
    if role == "assistant" and raw.get("tool_calls"):
        msg["tool_calls"] = normalize_calls(raw["tool_calls"], f"{field}.tool_calls", declared)
    elif "tool_calls" in raw and raw["tool_calls"] != []:
        raise RowError(f"{field}.tool_calls", f"only assistant turns make tool calls (this is a {role} turn)")
    if content is None and not msg.get("tool_calls"):
        raise RowError(f"{field}.content", "missing")
    if role == "tool" and raw.get("name") is not None:
        msg["name"] = str(raw["name"])
    return msg


def normalize_reference(raw, declared: set[str]) -> dict | None:
    """The reference as an assistant message (``content`` and/or ``tool_calls``), or None. A string is
    the answer's text, even when that text is JSON (a structured answer)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return {"role": "assistant", "content": raw}
    if isinstance(raw, list):
        return {"role": "assistant", "content": None, "tool_calls": normalize_calls(raw, "reference", declared)}
    if isinstance(raw, dict):
        msg = normalize_message({"role": "assistant", **raw}, "reference", declared)
        if msg["role"] != "assistant":
            raise RowError("reference.role", "a reference is an assistant message")
        return msg
    raise RowError("reference", f"must be text, an assistant message or a list of tool calls (got {type(raw).__name__})")


def conversation_id(messages: list[dict]) -> str:
    return "row-" + hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:12]


def parse_row(raw, fields: dict[str, str]) -> dict:
    """A normalized row: ``id``, ``messages``, ``tools``, ``reference`` (assistant message or None),
    ``layer``, ``slice``, ``meta``. Raises RowError naming the first problem."""
    if not isinstance(raw, dict):
        raise RowError("(row)", f"must be a JSON object (got {type(raw).__name__})")
    col = {name: fields.get(name, name) for name in FIELDS}
    if col["reference"] not in raw and "reference" not in fields and "reference_answer" in raw:
        col["reference"] = "reference_answer"
    if raw.get(col["messages"]) is None:
        raise RowError(col["messages"], "missing: every row needs its conversation")
    tools = normalize_tools(raw.get(col["tools"]), col["tools"])
    declared = {t["function"]["name"] for t in tools}
    msgs_raw = _json_value(raw[col["messages"]], col["messages"])
    if not isinstance(msgs_raw, list) or not msgs_raw:
        raise RowError(col["messages"], "must be a non-empty list of turns")
    messages = [normalize_message(m, f"{col['messages']}[{i}]", declared) for i, m in enumerate(msgs_raw)]
    open_calls = 0
    for i, m in enumerate(messages):
        if m["role"] == "tool" and open_calls == 0:
            raise RowError(f"{col['messages']}[{i}]", "tool turn answers no tool call (no assistant tool_calls before it)")
        open_calls = len(m.get("tool_calls", [])) if m["role"] == "assistant" else open_calls - (m["role"] == "tool")
    if not any(m["role"] == "user" for m in messages):
        raise RowError(col["messages"], "no user turn")
    reference = normalize_reference(raw.get(col["reference"]), declared)
    layer = raw.get(col["layer"]) or "core"
    if layer not in LAYERS:
        raise RowError(col["layer"], f"unknown layer {layer!r}; allowed: {', '.join(LAYERS)}")
    slice_ = raw.get(col["slice"]) or DEFAULT_SLICE
    if not isinstance(slice_, str):
        raise RowError(col["slice"], "must be a string tag")
    row_id = raw.get(col["id"])
    if row_id is not None and not isinstance(row_id, (str, int)):
        raise RowError(col["id"], "must be a string or an integer")
    used = set(col.values()) | {"reference_answer"}
    meta = {k: v for k, v in raw.items() if k not in used and v is not None}
    return {"id": str(row_id) if row_id is not None else conversation_id(msgs_raw), "messages": messages, "tools": tools,
            "reference": reference, "layer": layer, "slice": slice_, "meta": meta}  # fmt: skip


# -- turns to learn -------------------------------------------------------------------------------


def turns_to_learn(row: dict, learn: str) -> list[tuple[int, list[dict], dict | None]]:
    """(turn index, prompt turns, reference) per example of a row. ``last``: the last assistant turn
    (or the given reference); ``every``: each assistant turn in its logged context, and the given
    reference (or an open answer) after a conversation that ends with the user or a tool."""
    msgs, ref = row["messages"], row["reference"]
    trailing = msgs[-1]["role"] == "assistant"
    if learn == "last":
        prompt = msgs[:-1] if trailing else msgs
        return [(len(prompt), prompt, ref if ref is not None else (msgs[-1] if trailing else None))]
    out = [(k, msgs[:k], m) for k, m in enumerate(msgs) if m["role"] == "assistant"]
    if trailing and ref is not None:
        out[-1] = (out[-1][0], out[-1][1], ref)
    elif not trailing:
        out.append((len(msgs), msgs, ref))
    return out


def check_prompt(prompt: list[dict], field: str) -> None:
    """The turn to learn answers something: a user turn came before it, and it follows a user or tool turn."""
    if not any(m["role"] == "user" for m in prompt):
        raise RowError(field, "assistant turn before any user turn: nothing to answer")
    if prompt[-1]["role"] not in ("user", "tool"):
        raise RowError(field, f"the turn to learn follows a {prompt[-1]['role']} turn; it must follow a user or tool turn")


# -- text the models see -------------------------------------------------------------------------


def reference_text(ref: dict | None) -> str | None:
    """An assistant message as the models write it: its text, then one ``<tool_call>`` block per call."""
    if ref is None:
        return None
    calls = "".join(toolcalls.format_call({"name": c["name"], "arguments": c["arguments"]}) for c in ref.get("tool_calls", []))
    return ((ref.get("content") or "") + calls) or None


def text_messages(messages: list[dict]) -> list[dict]:
    """OpenAI-format turns as plain ``role`` / ``content`` turns every backend and chat template takes."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            out.append({"role": "assistant", "content": reference_text(m) or ""})
        elif m["role"] == "tool":
            out.append({"role": "tool", "content": f"<tool_response>{m['content']}</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def system_prompt(base: str | None, tools: list[dict]) -> str | None:
    """A system prompt with the row's tools appended (one JSON schema per line)."""
    if not tools:
        return base
    lines = [json.dumps(t["function"], ensure_ascii=False, sort_keys=True) for t in tools]
    return "\n\n".join(p for p in (base, TOOLS_INSTRUCTION + "\n" + "\n".join(lines)) if p)


def request_text(prompt: list[dict]) -> str:
    """The prompt as one text (deduplication and the contamination check read it)."""
    return "\n".join(m["content"] for m in text_messages([m for m in prompt if m["role"] != "system"]))


# -- files to examples ----------------------------------------------------------------------------


def load(files: list[tuple[str, str | None]], fields: dict[str, str], learn: str) -> tuple[list[dict], list[BadRow]]:
    """Rows of ``files`` (path, pinned split or None), each parsed into its examples (without context
    and checks: ``stillroom.chat_task`` adds those); the malformed rows, named."""
    examples, bad, seen = [], [], {}
    for path, split in files:
        for line, raw in read_rows(path):
            if isinstance(raw, BadRow):
                bad.append(raw)
                continue
            try:
                row = parse_row(raw, fields)
                if row["id"] in seen:
                    raise RowError(fields.get("id", "id"), f"{row['id']!r} repeats the row at {seen[row['id']]}")
                turns = turns_to_learn(row, learn)
                name = fields.get("messages", "messages")
                for k, prompt, _ in turns:
                    check_prompt(prompt, f"{name}[{k}]" if k < len(row["messages"]) else name)
            except RowError as e:
                bad.append(BadRow(str(path), line, e.field, e.what))
                continue
            seen[row["id"]] = f"{Path(path).name}:{line}"
            for k, prompt, ref in turns:
                ex_id = row["id"] if learn == "last" else f"{row['id']}/t{k}"
                examples.append({"id": ex_id, "group": row["id"], "source": f"{Path(path).name}:{line}", "split": split,
                                 "layer": row["layer"], "slice": row["slice"], "meta": row["meta"], "tools": row["tools"],
                                 "messages": prompt, "reference_message": ref})  # fmt: skip
    return examples, bad


def inspect(path: str | Path, fields: dict[str, str] | None = None) -> dict:
    """What ``stillroom init`` reports about a file: rows, columns, tools, references, turns, bad rows."""
    fields = fields or {}
    rows, columns, bad = [], set(), []
    for line, raw in read_rows(path):
        if isinstance(raw, BadRow):
            bad.append(raw)
            continue
        if isinstance(raw, dict):
            columns |= set(raw)
        try:
            rows.append(parse_row(raw, fields))
        except RowError as e:
            bad.append(BadRow(str(path), line, e.field, e.what))
    assistant_turns = [sum(m["role"] == "assistant" for m in r["messages"]) for r in rows]
    return {
        "rows": len(rows) + len(bad), "good_rows": len(rows), "bad_rows": [str(b) for b in bad], "columns": sorted(columns),
        "with_tools": sum(bool(r["tools"]) for r in rows),
        "with_reference": sum(r["reference"] is not None or r["messages"][-1]["role"] == "assistant" for r in rows),
        "with_tool_calls": sum(any(m.get("tool_calls") for m in r["messages"]) or bool((r["reference"] or {}).get("tool_calls"))
                               for r in rows),
        "multi_turn": sum(n > 1 for n in assistant_turns),
        "max_assistant_turns": max(assistant_turns, default=0),
        "layers": sorted({r["layer"] for r in rows}), "slices": sorted({r["slice"] for r in rows}),
    }  # fmt: skip
