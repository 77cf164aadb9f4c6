"""Chat rows from files: the bad-data corpus (one named error per malformed row, exact counts when
skipped), field mapping, Parquet, splits and the turns learned."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stillroom import chat_data
from stillroom.config import ConfigError, load_config

TOOL = {"type": "function", "function": {"name": "get_order", "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}}
USER = {"role": "user", "content": "Where is order 7?"}
GOOD = {"messages": [USER, {"role": "assistant", "content": "Let me check."}]}

# (the JSON line, the field named, words of the error): every kind of malformed row, one per line
BAD = [
    ('{"messages": [', "(row)", "not JSON"),
    ("[1, 2]", "(row)", "must be a JSON object"),
    (json.dumps({"prompt": "hi"}), "messages", "missing"),
    (json.dumps({"messages": []}), "messages", "non-empty list"),
    (json.dumps({"messages": [{"role": "system", "content": "Be nice."}]}), "messages", "no user turn"),
    (json.dumps({"messages": [{"role": "robot", "content": "beep"}, USER]}), "messages[0].role", "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": 42}]}), "messages[0].content", "must be a string"),
    (json.dumps({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "launch", "arguments": "{}"}}]}],
                 "tools": [TOOL]}), "messages[1].tool_calls[0].function.name", "undeclared function 'launch'"),
    (json.dumps({"messages": [USER, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "get_order", "arguments": "{id: 7"}}]}],
                 "tools": [TOOL]}), "messages[1].tool_calls[0].function.arguments", "not valid JSON"),
    (json.dumps({"messages": [USER], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]}),
     "tools[0].function.parameters", "not a JSON Schema"),
    (json.dumps({"messages": [USER], "tools": [{"type": "function", "function": {"description": "no name"}}]}), "tools[0].function.name", "missing"),
    (json.dumps({"messages": [USER, {"role": "tool", "content": "{}"}]}), "messages[1]", "answers no tool call"),
    (json.dumps({"messages": [USER], "layer": "middle"}), "layer", "unknown layer 'middle'"),
    (json.dumps({"messages": [USER], "reference": 12}), "reference", "must be text, an assistant message or a list of tool calls"),
    (json.dumps({"id": "dup", **GOOD}), "id", "'dup' repeats the row at"),
    (json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"}, USER]}), "messages[1]",
     "before any user turn"),
]


def corpus_file(tmp_path):
    """Good rows between the bad ones (the duplicate id follows its first use)."""
    lines = [json.dumps({"id": "dup", **GOOD})]
    for i, (line, _, _) in enumerate(BAD):
        lines += [line, json.dumps({"id": f"good-{i}", **GOOD})]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(tmp_path, data: dict) -> object:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"student": {"model": "default"}, "data": {"task": "chat", "learn": "every", **data}}))
    return path


def test_every_malformed_row_is_named_by_file_line_and_field(tmp_path):
    path = corpus_file(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(config(tmp_path, {"train": str(path)}))
    problems = e.value.problems
    assert len(BAD) >= 10 and len(problems) == len(BAD)  # one error per bad row, none for the good ones
    for k, ((_, field, words), problem) in enumerate(zip(BAD, problems)):
        assert problem.startswith(f"{path}:{2 + 2 * k}: {field}: "), problem
        assert words in problem, problem


def test_skip_drops_exactly_the_bad_rows_and_counts_them(tmp_path):
    from stillroom.chat_task import examples_from_config

    cfg = load_config(config(tmp_path, {"train": str(corpus_file(tmp_path)), "on_bad_row": "skip"}))
    examples, card = examples_from_config(cfg)
    assert card["bad_rows_skipped"] == len(BAD)
    assert card["rows_with_examples"] == len(BAD) + 1 and {e["group"] for e in examples} == {"dup", *(f"good-{i}" for i in range(len(BAD)))}
    by_field = collections.Counter(field.split("[")[0] for _, field, _ in BAD)
    assert card["bad_rows_by_field"] == dict(by_field) and len(card["bad_rows"]) == len(BAD)


def test_validate_cli_lists_bad_rows_without_loading_a_model(tmp_path):
    cfg = config(tmp_path, {"train": str(corpus_file(tmp_path))})
    code = "import sys; from stillroom.cli import app; sys.argv = ['stillroom', 'validate', sys.argv[1]]\ntry:\n app()\nexcept SystemExit as e:\n" \
           " print('torch' in sys.modules, e.code)"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, check=False)
    assert out.stdout.split() == ["False", "2"], out.stderr[-2000:]
    assert out.stderr.count("error ") == len(BAD)


def test_fields_map_other_columns_and_parquet_rows_read_like_json_lines(tmp_path):
    rows = [{"uid": f"r{i}", "conversation": [USER, {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": "get_order", "arguments": json.dumps({"order_id": str(i)})}}]}],
             "functions": json.dumps([TOOL]), "answer": None, "team": "west"} for i in range(3)]  # fmt: skip
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    fields = {"id": "uid", "messages": "conversation", "tools": "functions", "reference": "answer"}
    examples, bad = chat_data.load([(str(path), None)], fields, "last")
    assert bad == []
    assert [e["id"] for e in examples] == ["r0", "r1", "r2"]
    assert examples[2]["reference_message"]["tool_calls"] == [{"name": "get_order", "arguments": {"order_id": "2"}}]
    assert examples[0]["tools"][0]["function"]["name"] == "get_order" and examples[0]["meta"] == {"team": "west"}
    assert examples[0]["messages"] == [{"role": "user", "content": "Where is order 7?"}]


def test_turns_learned_last_or_every_and_given_files_pin_their_split(tmp_path):
    convo = {"id": "c", "messages": [USER, {"role": "assistant", "content": "one"}, {"role": "user", "content": "and 8?"},
                                     {"role": "assistant", "content": "two"}]}  # fmt: skip
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(convo) + "\n")
    held = tmp_path / "eval.jsonl"
    held.write_text(json.dumps({"id": "e", "messages": [USER], "reference_answer": "Order 7 is on its way."}) + "\n")
    last, _ = chat_data.load([(str(train), None)], {}, "last")
    every, _ = chat_data.load([(str(train), None), (str(held), "eval")], {}, "every")
    assert [(e["id"], len(e["messages"]), e["reference_message"]["content"]) for e in last] == [("c", 3, "two")]
    assert [(e["id"], len(e["messages"]), e["reference_message"]["content"], e["split"]) for e in every] == [
        ("c/t1", 1, "one", None), ("c/t3", 3, "two", None), ("e/t1", 1, "Order 7 is on its way.", "eval")]  # fmt: skip


def test_chat_only_fields_are_refused_for_the_built_in_task(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"data": {"learn": "every"}}))
    with pytest.raises(ConfigError, match="learn: only with data.task: chat"):
        load_config(path)
    path.write_text(yaml.safe_dump({"data": {"n_examples": 20}}))
    written = tmp_path / "written.yaml"  # what a run writes to its config.yaml, every default spelled out
    written.write_text(yaml.safe_dump(load_config(path).model_dump(mode="json")))
    assert load_config(written).data.task == "toolcall"


def test_prepare_runs_again_when_a_data_file_changes(tmp_path):
    from stillroom.pipeline import run_pipeline

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"id": "a", **GOOD}) + "\n")
    cfg = load_config(config(tmp_path, {"train": str(data)}), [f"run.dir={tmp_path / 'runs'}"])
    root = run_pipeline(cfg, until="prepare")
    key = json.loads((root / "prepare" / "manifest.json").read_text())["key"]
    assert json.loads((root / "prepare" / "manifest.json").read_text())["counts"]["examples"] == 1
    run_pipeline(cfg, until="prepare")  # unchanged: skipped, same key
    assert json.loads((root / "prepare" / "manifest.json").read_text())["key"] == key
    data.write_text(json.dumps({"id": "a", **GOOD}) + "\n" + json.dumps({"id": "b", **GOOD}) + "\n")
    run_pipeline(cfg, until="prepare")
    manifest = json.loads((root / "prepare" / "manifest.json").read_text())
    assert manifest["key"] != key and manifest["counts"]["examples"] == 2
