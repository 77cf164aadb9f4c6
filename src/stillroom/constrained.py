"""Constrained decoding: an output format the model cannot leave, enforced token by token.

A constraint is a plain JSON-able dict, the same on every engine:

- ``{"type": "json_schema", "schema": {...}}``: the whole answer is one JSON value valid for the schema;
- ``{"type": "json_object"}``: the whole answer is one JSON object;
- ``{"type": "tools", "tools": [...OpenAI tools...], "choice": "auto" | "required" | "none"}``: tool calls
  are ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks whose name is an offered tool
  and whose arguments are valid for that tool's ``parameters`` (extra keys refused, as ``strict``
  does); ``auto``: free text, calls anywhere in it; ``required``: one or more calls and nothing else;
  ``none``: free text that never opens a ``<tool_call>``. A named ``tool_choice`` is ``required`` with
  that one tool offered; ``"parallel": false`` allows one call at most.

``structural_tag(constraint)`` turns it into xgrammar's structural-tag description (engine-neutral JSON:
an engine with its own grammar format, such as llama.cpp's GBNF, translates from the constraint or this);
``logits_processor(model, tokenizer, constraints)`` is the torch engine's side (xgrammar, one grammar per
batch row, ``None`` for an unconstrained row); ``problem(constraint)`` says why a constraint cannot be
compiled (a bad schema) before any model runs; ``satisfied(constraint, text)`` checks an output after the
fact (tests, benchmarks, eval). The guarantee covers finished outputs: an answer cut by ``max_tokens``
stops wherever it was.
"""

from __future__ import annotations

import functools
import json

import jsonschema

from stillroom import toolcalls

KINDS = ("json_schema", "json_object", "tools")
MAX_WHITESPACE = 1  # consecutive whitespace characters inside JSON: a weak model cannot pad forever


def for_tools(tools: list[dict], choice: str = "auto", name: str | None = None, parallel: bool = True) -> dict:
    """The constraint for offered ``tools``; ``name``: OpenAI's named ``tool_choice`` (that tool, required);
    ``parallel`` False: at most one call (OpenAI's ``parallel_tool_calls: false``)."""
    if name is not None:
        tools, choice = [t for t in tools if t["function"]["name"] == name], "required"
    return {"type": "tools", "tools": tools, "choice": choice, "parallel": parallel}


def for_example(example: dict, mode: str) -> dict | None:
    """``signals.constrain`` / ``eval.constrain`` for one example: ``tools``: calls held to the tools the
    example offers (free text stays free); ``none``, or an example without tools: None."""
    if mode == "tools" and example.get("tools"):
        return for_tools(example["tools"])
    return None


def _strict(params: dict) -> dict:
    """A tool's parameters as strict mode reads them: no keys beyond the declared ones (what
    ``toolcalls.schema_problems`` checks too)."""
    return {"additionalProperties": False, **params} if params.get("type", "object") == "object" else params


def _call_tag(tool: dict) -> dict:
    fn = tool["function"]
    params = _strict(fn.get("parameters") or {"type": "object", "properties": {}})
    begin = "<tool_call>" + json.dumps({"name": fn["name"], "arguments": None}, ensure_ascii=False).removesuffix("null}")
    return {"type": "tag", "begin": begin, "end": "}</tool_call>",
            "content": {"type": "json_schema", "json_schema": params, "max_whitespace_cnt": MAX_WHITESPACE}}  # fmt: skip


def structural_tag(constraint: dict) -> dict:
    """The constraint as an xgrammar structural tag (``{"type": "structural_tag", "format": ...}``)."""
    kind = constraint["type"]
    if kind == "json_schema":
        fmt = {"type": "json_schema", "json_schema": constraint["schema"], "max_whitespace_cnt": MAX_WHITESPACE}
    elif kind == "json_object":
        fmt = {"type": "json_schema", "json_schema": {"type": "object"}, "max_whitespace_cnt": MAX_WHITESPACE}
    elif kind == "tools":
        tags, choice = [_call_tag(t) for t in constraint["tools"]], constraint["choice"]
        if choice == "none" or not tags:
            return {"type": "structural_tag", "format": {"type": "any_text", "excludes": ["<tool_call>"]}}
        if choice == "required":  # calls back to back, the way the task's references write several
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": "", "at_least_one": True}
        else:
            fmt = {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags}
        fmt["stop_after_first"] = not constraint.get("parallel", True)
    else:
        raise ValueError(f"unknown constraint type {kind!r}; known: {', '.join(KINDS)}")
    return {"type": "structural_tag", "format": fmt}


def available() -> bool:
    """Is the torch engine's grammar library (xgrammar, the ``structured`` extra) installed."""
    import importlib.util

    return importlib.util.find_spec("xgrammar") is not None


def problem(constraint: dict) -> str | None:
    """Why ``constraint`` cannot be used (a schema that is not JSON Schema, or one the grammar engine
    cannot compile), or None. Builds the grammar without a tokenizer, so no model is needed."""
    schemas = [constraint["schema"]] if constraint["type"] == "json_schema" else []
    schemas += [t["function"].get("parameters") or {} for t in constraint.get("tools", [])]
    for s in schemas:
        try:
            jsonschema.Draft202012Validator.check_schema(s)
        except jsonschema.SchemaError as e:
            return f"not a JSON Schema: {e.message}"
    try:
        import xgrammar as xgr

        xgr.Grammar.from_structural_tag(json.dumps(structural_tag(constraint)))
    except ImportError:
        return "constrained decoding needs the grammar engine: pip install 'stillroom[structured]' (xgrammar)"
    except Exception as e:  # xgrammar raises plain RuntimeError/ValueError on schemas it does not support
        return f"the grammar engine cannot compile it: {str(e).splitlines()[0][:300]}"
    return None


def satisfied(constraint: dict, text: str) -> bool:
    """Does ``text`` meet ``constraint`` (checked with jsonschema and the tool-call parser, not the grammar)."""
    kind = constraint["type"]
    if kind in ("json_schema", "json_object"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        if kind == "json_object":
            return isinstance(value, dict)
        return jsonschema.Draft202012Validator(constraint["schema"]).is_valid(value)
    parsed = toolcalls.parse(text)
    if constraint["choice"] == "none":
        return not parsed.has_call_attempt
    if parsed.errors or any(toolcalls.schema_problems(c, constraint["tools"]) for c in parsed.calls):
        return False
    if not constraint.get("parallel", True) and len(parsed.calls) > 1:
        return False
    return bool(parsed.calls) and not parsed.text if constraint["choice"] == "required" else True


# -- the torch engine (xgrammar) -------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _compiler(tokenizer, vocab_size: int):
    import xgrammar as xgr

    from stillroom.generation import end_of_turn_id

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=[end_of_turn_id(tokenizer)])
    return xgr.GrammarCompiler(info, cache_enabled=True)  # compiled grammars are cached by their text


def compile_for(tokenizer, vocab_size: int, constraint: dict):
    return _compiler(tokenizer, vocab_size).compile_structural_tag(json.dumps(structural_tag(constraint)))  # key order kept: it is the order properties must come in


class GrammarMask:
    """A transformers logits processor: row i may only emit tokens its grammar allows (masked to -inf
    before temperature, top-p or Gumbel sampling). One instance per ``generate`` call."""

    def __init__(self, compiled: list, vocab_size: int):
        import xgrammar as xgr

        self.matchers = [xgr.GrammarMatcher(c) if c is not None else None for c in compiled]
        self.bitmask = xgr.allocate_token_bitmask(len(compiled), vocab_size)
        self.vocab_size, self.started = vocab_size, False

    def __call__(self, input_ids, scores):
        import xgrammar as xgr

        if self.started:  # the token chosen last step: advance each live row's matcher
            for i, m in enumerate(self.matchers):
                if m is not None and not m.is_terminated() and not m.accept_token(int(input_ids[i, -1])):
                    raise RuntimeError(f"row {i} emitted token {int(input_ids[i, -1])} its grammar refuses")
        self.started = True
        rows = [i for i, m in enumerate(self.matchers) if m is not None and not m.is_terminated()]
        if rows:
            for i in rows:
                self.matchers[i].fill_next_token_bitmask(self.bitmask, i)
            xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device), vocab_size=self.vocab_size, indices=rows)
        return scores


def logits_processor(model, tokenizer, constraints: list[dict | None]) -> GrammarMask | None:
    """The mask for a batch (``constraints[i]`` for row i, None: free), or None when no row is constrained."""
    if not any(constraints):
        return None
    vocab_size = model.config.vocab_size
    return GrammarMask([compile_for(tokenizer, vocab_size, c) if c else None for c in constraints], vocab_size)
