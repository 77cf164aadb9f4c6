"""Checks as config: what a right answer is for a `chat` example, judged from the model's text.

A check is a plain dict (``data.checks`` entries, validated by ``config.CheckConfig``) with a ``name``,
a ``kind``, an optional ``weight`` and ``threshold``, optional ``slices`` it is limited to, and the
kind's parameters:

- ``reference_match``: the answer equals the row's reference text (``mode``: exact, normalized, json);
- ``tool_call_match``: the calls made are the reference's calls (names and parsed arguments; strings
  compared case- and space-insensitively), in order unless ``order_insensitive``;
- ``tool_schema``: every call made is well formed and valid for the row's tools;
- ``json_schema``: the answer parses as JSON and validates against ``schema``;
- ``regex``: the answer matches ``pattern`` (or must not, ``must_match: false``);
- ``python``: ``function: module:function``, called as ``fn(sample, row)``; ``sample`` has ``text``,
  ``answer`` (the text without call blocks) and ``tool_calls``; it returns a bool, a score in [0, 1],
  a (passed, reason) pair or a Verdict;
- ``judge``: an LLM grades the answer against ``rubric`` from 0 to 10 (the run's teacher unless
  ``teacher`` names another backend); the score is that grade / 10.

Each check gives a score in [0, 1] and passes when the score reaches its ``threshold`` (default 1, the
judge's 0.7), or does not apply to the example (None). An example passes when every check that applies
passes; the combined score is the weighted mean of their scores. Without configured checks an example
gets the defaults: reference match where it has a reference, schema-valid tool calls where it has tools.
"""

from __future__ import annotations

import functools
import importlib
import json
import re

import jsonschema

from stillroom import toolcalls
from stillroom.tasks import Verdict
from stillroom.textnorm import normalize

KINDS = ("reference_match", "tool_call_match", "tool_schema", "json_schema", "regex", "python", "judge")
DEFAULT_THRESHOLD = {"judge": 0.7}
JUDGE_SYSTEM = ("You grade an assistant's answer against a rubric. Reply with one line, `Score: N`, where N is an "
                "integer from 0 (fails the rubric) to 10 (fully meets it).")  # fmt: skip
SCORE_RE = re.compile(r"score\W{0,3}(\d+(?:\.\d+)?)|^\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def default_checks(example: dict) -> list[dict]:
    """Reference match where the example has a reference (its calls when it makes calls, else its text,
    normalized); schema-valid tool calls where it has tools."""
    out = []
    ref = example.get("reference_message")
    if ref is not None:
        out.append({"name": "reference", "kind": "tool_call_match"} if ref.get("tool_calls")
                   else {"name": "reference", "kind": "reference_match", "mode": "normalized"})  # fmt: skip
    if example.get("tools"):
        out.append({"name": "tool_schema", "kind": "tool_schema"})
    return out


def sample_of(text: str) -> dict:
    parsed = toolcalls.parse(text)
    return {"text": text, "answer": parsed.text, "tool_calls": parsed.calls, "call_errors": parsed.errors}


def run_one(spec: dict, example: dict, text: str) -> Verdict | None:
    """One check's verdict on an answer, or None where it does not apply."""
    if spec.get("slices") and example.get("slice") not in spec["slices"]:
        return None
    verdict = KIND_FUNCTIONS[spec["kind"]](spec, example, sample_of(text))
    if verdict is None:
        return None
    threshold = spec.get("threshold")
    threshold = DEFAULT_THRESHOLD.get(spec["kind"], 1.0) if threshold is None else threshold
    passed = verdict.score >= threshold
    reason = "ok" if passed else (verdict.reason if verdict.reason != "ok" else f"score {verdict.score:.2f} < {threshold}")
    return Verdict(passed, reason, verdict.score)


def run_all(example: dict, text: str, only: list[str] | None = None) -> Verdict:
    """Every check of the example (or those named in ``only``) on ``text``: passes when each one that
    applies passes; the reason names the first that failed (``name/reason``); the score is their weighted mean."""
    specs = example.get("checks") or default_checks(example)
    results = [(s, run_one(s, example, text)) for s in specs if only is None or s["name"] in only]
    results = [(s, v) for s, v in results if v is not None]
    if not results:
        return Verdict(True, "n/a", 1.0)
    failed = next(((s, v) for s, v in results if not v.passed), None)
    total = sum(s.get("weight", 1.0) for s, _ in results) or 1.0
    score = sum(s.get("weight", 1.0) * v.score for s, v in results) / total
    return Verdict(failed is None, "ok" if failed is None else f"{failed[0]['name']}/{failed[1].reason}", score)


# -- the kinds ------------------------------------------------------------------------------------


def _verdict(ok: bool, reason: str) -> Verdict:
    return Verdict(ok, "ok" if ok else reason, float(ok))


def reference_match(spec: dict, example: dict, sample: dict) -> Verdict | None:
    want = (example.get("reference_message") or {}).get("content")
    if not want:
        return None
    mode, got = spec.get("mode", "normalized"), sample["text"]
    if mode == "exact":
        return _verdict(got.strip() == want.strip(), "differs_from_reference")
    if mode == "normalized":
        return _verdict(normalize(got) == normalize(want), "differs_from_reference")
    try:
        want_obj = json.loads(want)
    except json.JSONDecodeError:
        return _verdict(False, "reference_not_json")
    try:
        got_obj = json.loads(got)
    except json.JSONDecodeError as e:
        return _verdict(False, f"not_json: {e.msg}")
    return _verdict(got_obj == want_obj, "json_differs_from_reference")


def tool_call_match(spec: dict, example: dict, sample: dict) -> Verdict | None:
    ref = example.get("reference_message")
    if ref is None:
        return None
    want, got = ref.get("tool_calls", []), sample["tool_calls"]
    if sample["call_errors"]:
        return _verdict(False, "malformed_call")
    if len(got) != len(want):
        return _verdict(False, "no_call_made" if not got else "unexpected_call" if not want else "wrong_number_of_calls")
    if spec.get("order_insensitive"):
        left = list(want)
        for g in got:
            match = next((w for w in left if toolcalls.same_call(g, w)), None)
            if match is None:
                return _verdict(False, "wrong_function" if all(g["name"] != w["name"] for w in left) else "wrong_arguments")
            left.remove(match)
        return _verdict(True, "ok")
    for g, w in zip(got, want):
        if g["name"] != w["name"]:
            return _verdict(False, "wrong_function")
        if not toolcalls.same_call(g, w):
            return _verdict(False, "wrong_arguments")
    return _verdict(True, "ok")


def tool_schema(spec: dict, example: dict, sample: dict) -> Verdict | None:
    tools = example.get("tools") or []
    if not tools and not (sample["tool_calls"] or sample["call_errors"]):
        return None
    if sample["call_errors"]:
        return _verdict(False, "malformed_call: " + sample["call_errors"][0])
    problems = [p for c in sample["tool_calls"] for p in toolcalls.schema_problems(c, tools)] if tools else ["no tools offered"]
    if sample["tool_calls"] and problems:
        return _verdict(False, "schema: " + problems[0])
    return _verdict(True, "ok")


def json_schema(spec: dict, example: dict, sample: dict) -> Verdict:
    try:
        obj = json.loads(sample["text"])
    except json.JSONDecodeError as e:
        return _verdict(False, f"not_json: {e.msg}")
    errors = sorted(jsonschema.Draft202012Validator(spec["schema"]).iter_errors(obj), key=str)
    return _verdict(not errors, f"schema: {errors[0].message}" if errors else "ok")


def regex(spec: dict, example: dict, sample: dict) -> Verdict:
    found = bool(re.search(spec["pattern"], sample["text"], re.DOTALL))
    must = spec.get("must_match", True)
    return _verdict(found == must, "no_match" if must else "forbidden_match")


def load_function(path: str):
    """``module:function`` imported; ValueError naming the problem."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"function {path!r} must look like package.module:function")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {path!r}: {e}") from None


def python(spec: dict, example: dict, sample: dict) -> Verdict | None:
    fn = load_function(spec["function"])
    out = fn(sample, example)
    if out is None or isinstance(out, Verdict):
        return out
    if isinstance(out, tuple):
        return Verdict(bool(out[0]), str(out[1]) if not out[0] else "ok", float(bool(out[0])))
    if isinstance(out, bool):
        return _verdict(out, f"{fn.__name__}_failed")
    return Verdict(True, "ok", max(0.0, min(1.0, float(out))))


def judge_messages(spec: dict, example: dict, text: str) -> list[dict]:
    """The judge's prompt: the rubric, the conversation, the reference where known, the answer."""
    from stillroom.chat_data import reference_text, text_messages

    convo = "\n".join(f"{m['role']}: {m['content']}" for m in text_messages(example.get("messages", [])))
    ref = reference_text(example.get("reference_message"))
    parts = [f"Rubric: {spec['rubric']}", f"Conversation:\n{convo}", *([f"Reference answer:\n{ref}"] if ref else []),
             f"Answer to grade:\n{text}"]  # fmt: skip
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_grade(reply: str) -> float | None:
    """``Score: 7`` (or a reply that starts with the number) -> 0.7; None when there is no grade."""
    m = SCORE_RE.search(reply)
    if m is None:
        return None
    return min(float(m.group(1) or m.group(2)), 10.0) / 10


@functools.lru_cache(maxsize=4)
def judge_endpoint(teacher_json: str):
    """The judge's teacher backend, built once per process and teacher config."""
    from stillroom.config import TeacherConfig
    from stillroom.plugins import registry

    cfg = TeacherConfig.model_validate(json.loads(teacher_json))
    return registry().get("teacher", cfg.backend)(cfg)


def judge(spec: dict, example: dict, sample: dict) -> Verdict:
    from stillroom.teachers import Sampling

    endpoint = judge_endpoint(json.dumps(spec["teacher"], sort_keys=True))
    reply = endpoint.complete([judge_messages(spec, example, sample["text"])], Sampling(spec.get("max_new_tokens", 16)), [0], 0)[0].text
    grade = parse_grade(reply)
    if grade is None:
        return Verdict(False, f"judge_gave_no_score: {reply[:60]!r}", 0.0)
    return Verdict(True, "ok", grade)


KIND_FUNCTIONS = {"reference_match": reference_match, "tool_call_match": tool_call_match, "tool_schema": tool_schema,
                  "json_schema": json_schema, "regex": regex, "python": python, "judge": judge}  # fmt: skip


# -- the verifier and the metrics that expose checks to `select` and `eval` ----------------------


def verifier(only: list[str] | None = None):
    """Verifier ``checks``: the example's checks (all, or those named in ``only``) on a candidate."""

    def verify(example: dict, candidate: dict) -> Verdict:
        if example.get("task") != "chat":
            return Verdict(True, "n/a", 1.0)
        return run_all(example, candidate["text"], only)

    return verify


def metric(name: str):
    """Metric ``check:NAME``: 1 when the check passes, 0 when it fails, None where it does not apply."""

    def measure(example: dict, output: dict) -> float | None:
        spec = next((s for s in example.get("checks") or default_checks(example) if s["name"] == name), None)
        verdict = run_one(spec, example, output["text"]) if spec is not None else None
        return None if verdict is None else float(verdict.passed)

    return measure


def call_validity():
    """Metric ``call_validity``: the calls an answer makes are well formed and valid for the example's
    tools (None where the example has no tools and the answer makes no call)."""

    def measure(example: dict, output: dict) -> float | None:
        v = tool_schema({}, example, sample_of(output["text"]))
        return None if v is None else float(v.passed)

    return measure
