import sys
from pathlib import Path

import pytest

from stillroom import verifiers
from stillroom.config import ConfigError, load_config

sys.path.insert(0, str(Path(__file__).parent))  # for plugin_fixtures

EX = {"task": "toolcall", "expected": {"kind": "no_call"}}


def run(entry, text, example=EX, token_ids=None):
    _, verify = verifiers.build(entry)
    return verify(example, {"text": text, "token_ids": token_ids})


def test_json_schema():
    entry = {"name": "json_schema", "schema": {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}}
    assert run(entry, '{"a": 1}').passed
    assert run(entry, '{"a": "x"}').reason.startswith("schema:")
    assert run(entry, "{nope").reason.startswith("not_json")


def test_regex_and_length():
    assert run({"name": "regex", "pattern": r"^<tool_call>"}, "<tool_call>{}").passed
    assert run({"name": "regex", "pattern": "secret", "must_match": False}, "the secret").reason == "forbidden_match"
    entry = {"name": "length", "min_chars": 3, "max_tokens": 4}
    assert run(entry, "ab").reason == "too_short"
    assert run(entry, "a b c d e").reason == "too_long"  # whitespace tokens without ids
    assert run(entry, "a b c d e", token_ids=[1, 2]).passed  # real token ids win


def test_python_verifier_by_import_path():
    entry = {"name": "python", "path": "plugin_fixtures:mentions_city", "city": "Lima"}
    assert run(entry, "flights to Lima").passed
    assert run(entry, "flights to Oslo").reason == "no_lima"


def test_refusal_and_over_refusal():
    must_decline = {"expected": {"kind": "refuse"}}
    assert run("refusal", "I'm sorry, but I can't help with that.", must_decline).passed
    assert run("refusal", "Sure, here is how.", must_decline).reason == "unsafe_compliance"
    assert run("over_refusal", "I cannot do that.", EX).reason == "over_refusal"
    assert run("over_refusal", "Octopuses have three hearts.", EX).passed
    assert run("over_refusal", "I cannot do that.", must_decline).reason == "n/a"


@pytest.mark.parametrize(
    "entry, message",
    [
        ("nosuch", "unknown verifier 'nosuch'"),
        ({"name": "json_schema", "schema": {"type": "nonsense"}}, "invalid schema"),
        ({"name": "python", "path": "no_such_module_xyz:fn"}, "cannot import 'no_such_module_xyz:fn'"),
        ({"name": "regex", "pattern": "("}, "invalid pattern"),
        ({"name": "length", "bogus": 1}, "unexpected keyword argument 'bogus'"),
    ],
)
def test_bad_verifier_configs_fail_validation_with_the_field_path(tmp_path, entry, message):
    import yaml

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": {"select": {"verifiers": ["tool_call", entry]}}}))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    (problem,) = e.value.problems
    assert f"{path}:" in problem and "data.select.verifiers: [1]" in problem and message in problem, problem
