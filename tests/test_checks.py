"""Each check kind of the `chat` task on fixed cases, their thresholds, weights and slices, the
defaults, and how config validation reports a bad check. The judge runs against a served model in
test_chat_task.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from stillroom import checks
from stillroom.config import CheckConfig, ConfigError, load_config

sys.path.insert(0, str(Path(__file__).parent))  # for plugin_fixtures

TOOLS = [{"type": "function", "function": {"name": "get_order", "parameters": {"type": "object", "properties": {
    "order_id": {"type": "string"}, "verbose": {"type": "boolean"}}, "required": ["order_id"]}}},
    {"type": "function", "function": {"name": "refund", "parameters": {"type": "object", "properties": {"amount": {"type": "number"}}}}}]  # fmt: skip


def example(reference=None, calls=None, tools=TOOLS, slice_="default", meta=None, specs=None) -> dict:
    ref = None
    if reference is not None or calls is not None:
        ref = {"role": "assistant", "content": reference, **({"tool_calls": calls} if calls else {})}
    return {"task": "chat", "slice": slice_, "tools": tools, "messages": [{"role": "user", "content": "hi"}],
            "reference_message": ref, "meta": meta or {}, "checks": specs}  # fmt: skip


def spec(**kw) -> dict:
    return CheckConfig.model_validate(kw).spec()


def one(s: dict, ex: dict, text: str):
    v = checks.run_one(s, ex, text)
    return None if v is None else (v.passed, v.reason)


CALL = '<tool_call>{"name": "get_order", "arguments": {"order_id": "A7"}}</tool_call>'
REFUND = '<tool_call>{"name": "refund", "arguments": {"amount": 5}}</tool_call>'


def test_reference_match_exact_normalized_and_json():
    ex = example("Your order ships Monday.")
    assert one(spec(name="r", kind="reference_match", mode="exact"), ex, "Your order ships Monday.") == (True, "ok")
    assert one(spec(name="r", kind="reference_match", mode="exact"), ex, "your order ships monday") == (False, "differs_from_reference")
    assert one(spec(name="r", kind="reference_match"), ex, "your order ships  monday") == (True, "ok")  # normalized by default
    js = example('{"team": "billing", "urgent": true}')
    assert one(spec(name="j", kind="reference_match", mode="json"), js, '{"urgent": true, "team": "billing"}') == (True, "ok")
    assert one(spec(name="j", kind="reference_match", mode="json"), js, '{"urgent": false, "team": "billing"}') == (False, "json_differs_from_reference")
    assert one(spec(name="j", kind="reference_match", mode="json"), js, "billing")[1].startswith("not_json")
    assert one(spec(name="r", kind="reference_match"), example(), "anything") is None  # no reference: does not apply


def test_tool_call_match_names_arguments_and_order():
    calls = [{"name": "get_order", "arguments": {"order_id": "A7"}}, {"name": "refund", "arguments": {"amount": 5}}]
    ex = example(calls=calls)
    ordered, any_order = spec(name="c", kind="tool_call_match"), spec(name="c", kind="tool_call_match", order_insensitive=True)
    assert one(ordered, ex, CALL + REFUND) == (True, "ok")
    assert one(ordered, ex, REFUND + CALL) == (False, "wrong_function")
    assert one(any_order, ex, REFUND + CALL) == (True, "ok")
    assert one(ordered, ex, CALL.replace("A7", " a7 ") + REFUND) == (True, "ok")  # strings: case and spaces ignored
    assert one(ordered, ex, CALL.replace("A7", "A8") + REFUND) == (False, "wrong_arguments")
    assert one(any_order, ex, REFUND.replace("5", "6") + CALL) == (False, "wrong_arguments")
    assert one(ordered, ex, CALL) == (False, "wrong_number_of_calls")
    assert one(ordered, ex, "Sure.") == (False, "no_call_made")
    assert one(ordered, ex, "<tool_call>{oops</tool_call>") == (False, "malformed_call")
    assert one(ordered, example("Your order ships Monday."), CALL) == (False, "unexpected_call")
    assert one(ordered, example("Your order ships Monday."), "It ships Monday.") == (True, "ok")


def test_tool_schema_checks_every_call_against_the_rows_tools():
    s = spec(name="t", kind="tool_schema")
    assert one(s, example(), CALL) == (True, "ok")
    assert one(s, example(), "No call needed.") == (True, "ok")
    assert one(s, example(), '<tool_call>{"name": "get_order", "arguments": {}}</tool_call>')[1] == "schema: get_order: 'order_id' is a required property"
    assert one(s, example(), '<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>')[1].startswith("schema: unknown function 'delete_all'")
    assert one(s, example(tools=[]), "plain") is None
    assert one(s, example(tools=[]), CALL) == (False, "schema: no tools offered")


def test_json_schema_regex_and_python():
    schema = {"type": "object", "properties": {"team": {"enum": ["billing", "shipping"]}}, "required": ["team"]}
    js = spec(name="triage", kind="json_schema", schema=schema)
    assert one(js, example(), '{"team": "billing"}') == (True, "ok")
    assert one(js, example(), '{"team": "legal"}')[1].startswith("schema: 'legal' is not one of")
    assert one(js, example(), "billing")[1].startswith("not_json")
    rx = spec(name="polite", kind="regex", pattern=r"(?i)\bsorry\b")
    assert one(rx, example(), "Sorry, I can't.") == (True, "ok") and one(rx, example(), "No.") == (False, "no_match")
    assert one(spec(name="no_urls", kind="regex", pattern="https?://", must_match=False), example(), "see http://x") == (False, "forbidden_match")
    py = spec(name="quotes", kind="python", function="plugin_fixtures:quotes_order_id")
    assert one(py, example(meta={"order_id": "A7"}), "Order A7 ships today.") == (True, "ok")
    assert one(py, example(meta={"order_id": "A7"}), "It ships today.") == (False, "order_id_missing")
    graded = spec(name="words", kind="python", function="plugin_fixtures:share_of_words", threshold=0.5)
    assert checks.run_one(graded, example("red green blue yellow"), "red green").score == 0.5
    assert one(graded, example("red green blue yellow"), "red green") == (True, "ok")
    assert one(graded, example("red green blue yellow"), "red") == (False, "score 0.25 < 0.5")


def test_run_all_combines_slices_weights_and_defaults():
    specs = [spec(name="triage", kind="json_schema", schema={"type": "object"}, slices=["triage"], weight=3),
             spec(name="polite", kind="regex", pattern="please")]  # fmt: skip
    triage = example(slice_="triage", specs=specs)
    v = checks.run_all(triage, '{"team": "billing"}')
    assert (v.passed, v.reason, v.score) == (False, "polite/no_match", 0.75)
    assert checks.run_all(example(slice_="other", specs=specs), "please wait").passed  # triage does not apply there
    # defaults: the reference's calls where it makes calls, its text otherwise; schema-valid calls where there are tools
    assert [s["kind"] for s in checks.default_checks(example(calls=[{"name": "refund", "arguments": {"amount": 5}}]))] == ["tool_call_match", "tool_schema"]
    assert [s["kind"] for s in checks.default_checks(example("ok", tools=[]))] == ["reference_match"]
    assert checks.run_all(example(tools=[]), "anything") == checks.Verdict(True, "n/a", 1.0)
    verify = checks.verifier(only=["polite"])
    assert verify(triage, {"text": "please"}).passed and not verify(triage, {"text": "no"}).passed
    assert checks.metric("triage")(triage, {"text": "[]"}) == 0.0 and checks.metric("triage")(example(specs=specs), {"text": "[]"}) is None


@pytest.mark.parametrize("entry, message", [
    ({"name": "a", "kind": "regex"}, "needs `pattern`"),
    ({"name": "a", "kind": "regex", "pattern": "("}, "invalid pattern"),
    ({"name": "a", "kind": "json_schema", "schema": {"type": "objekt"}}, "not a JSON Schema"),
    ({"name": "a", "kind": "json_schema"}, "needs `schema` or `schema_file`"),
    ({"name": "a", "kind": "python", "function": "nowhere_module:f"}, "cannot import"),
    ({"name": "a", "kind": "reference_match", "pattern": "x"}, "takes no pattern"),
    ({"name": "a", "kind": "judge"}, "needs `rubric`"),
    ({"name": "a", "kind": "spell_check"}, "Input should be"),
])  # fmt: skip
def test_a_bad_check_is_a_config_error_naming_the_field(tmp_path, entry, message):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"student": {"model": "default"}, "data": {"task": "chat", "train": str(data), "checks": [entry]}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert any(p.startswith(f"{path}:") and "data.checks.0" in p and message in p for p in e.value.problems), e.value.problems


def test_check_metrics_must_name_a_configured_check(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = tmp_path / "cfg.yaml"
    cfg = {"student": {"model": "default"}, "data": {"task": "chat", "train": str(data), "checks": [{"name": "polite", "kind": "regex", "pattern": "please"}]},
           "eval": {"metrics": ["task_success", "over_refusal", "unsafe_compliance", "check:polite", "check:nope"]}}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="no check named 'nope'"):
        load_config(path)
    cfg["eval"]["metrics"].pop()
    path.write_text(yaml.safe_dump(cfg))
    assert load_config(path).eval.metrics[-1] == "check:polite"


def test_chat_defaults_are_validated_like_given_values(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"student": {"model": "default"},
                                    "data": {"task": "chat", "train": str(data), "select": {"policy": "best_of_n", "score": "verifier:checks"}}}))  # fmt: skip
    cfg = load_config(path)
    assert cfg.data.select.verifiers == ["checks"] and cfg.eval.metrics[1] == "call_validity"
    built_in = tmp_path / "toolcall.yaml"
    built_in.write_text(yaml.safe_dump({"data": {"n_examples": 20}}))
    assert load_config(built_in).data.select.verifiers == ["tool_call", "no_call"]  # the built-in task's defaults stay


def test_a_written_run_config_with_checks_reads_back(tmp_path):
    """pipeline writes config.yaml from model_dump: the schema read from schema_file travels inline."""
    (tmp_path / "schema.json").write_text('{"type": "object"}')
    data = tmp_path / "rows.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"student": {"model": "default"}, "data": {"task": "chat", "train": "rows.jsonl",
                                    "checks": [{"name": "obj", "kind": "json_schema", "schema_file": "schema.json"}]}}))  # fmt: skip
    dumped = load_config(path).model_dump(mode="json")
    assert dumped["data"]["checks"][0]["schema_"] == {"type": "object"} and "schema_file" not in dumped["data"]["checks"][0]
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(dumped))
    assert load_config(again).data.checks[0].spec()["schema"] == {"type": "object"}
