"""OpenAI tool calling and structured outputs on `stillroom serve`, through the official `openai` client
against the real server (uvicorn, HTTP on loopback) serving a registry version of a tiny random model:
tool calls come back as `message.tool_calls`, a conversation carrying a tool result is answered,
`tool_choice: none` yields no call, unknown fields are refused, `response_format` holds, and task
success measured through the client equals the eval stage's on the same examples."""

from __future__ import annotations

import json

import jsonschema
import pytest
from finished_runs import make_run, serving

openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")

UNIT = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "metric": {"type": "boolean"}},
        "required": ["unit", "metric"]}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "set_unit", "description": "Set the temperature unit.", "parameters": UNIT}},
    {"type": "function", "function": {"name": "toggle_lights", "description": "Lights on or off.",
                                      "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}}},
]  # fmt: skip
ASK = [{"role": "user", "content": "Switch to celsius please."}]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("wire")
    run = make_run(root, "wire", 5, True, tiny_model_dir)
    with serving(root / "registry", [run]) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), run


def _valid_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)  # a JSON string, as OpenAI sends it
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(args, {**schema, "additionalProperties": False})
    return args


def test_a_tool_request_gets_tool_calls_back_and_a_tool_result_continues_the_conversation(served):
    # a random model spells a call nearly a character per token (about 64 tokens): room to finish it, as the grammar guarantees
    client, _ = served
    r = client.chat.completions.create(model="production", messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=160)  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _valid_call(choice.message.tool_calls[0])

    named = client.chat.completions.create(model="production", messages=ASK, tools=TOOLS, max_tokens=160, parallel_tool_calls=False,
                                           tool_choice={"type": "function", "function": {"name": "toggle_lights"}})  # fmt: skip
    assert [c.function.name for c in named.choices[0].message.tool_calls] == ["toggle_lights"]

    # the assistant turn goes back as the client returned it (the SDK's own message object), then the tool result
    call = choice.message.tool_calls[0]
    follow = ASK + [choice.message, {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True})}]
    r2 = client.chat.completions.create(model="production", messages=follow, tools=TOOLS, max_tokens=8)
    assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls") and r2.model == "v1"

    with pytest.raises(openai.BadRequestError, match="answers no tool call"):
        client.chat.completions.create(model="production", max_tokens=4, tools=TOOLS,
                                       messages=ASK + [{"role": "tool", "tool_call_id": "call_nope", "content": "{}"}])  # fmt: skip


def test_tool_choice_none_yields_no_calls_and_strict_tools_only_valid_ones(served):
    client, _ = served
    for seed in range(3):
        r = client.chat.completions.create(model="production", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=24,
                                           temperature=1.0, seed=seed)  # fmt: skip
        assert not r.choices[0].message.tool_calls and "<tool_call>" not in (r.choices[0].message.content or "")
        assert r.choices[0].finish_reason in ("stop", "length")
    strict = [{**t, "function": {**t["function"], "strict": True}} for t in TOOLS]
    r = client.chat.completions.create(model="production", messages=ASK, tools=strict, max_tokens=24)  # auto: free text or valid calls
    for call in r.choices[0].message.tool_calls or []:
        _valid_call(call)


def test_unknown_and_unsupported_fields_answer_400_naming_the_field(served):
    client, _ = served
    with pytest.raises(openai.BadRequestError, match="temprature: unknown field"):
        client.chat.completions.create(model="production", messages=ASK, max_tokens=4, extra_body={"temprature": 0.5})
    with pytest.raises(openai.BadRequestError, match="stop: unknown field"):
        client.chat.completions.create(model="production", messages=ASK, max_tokens=4, stop=["\n"])
    with pytest.raises(openai.BadRequestError, match="no tools are offered"):
        client.chat.completions.create(model="production", messages=ASK, max_tokens=4, tool_choice="required")
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model="production", messages=ASK, max_tokens=4, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "launch"}})  # fmt: skip
    with pytest.raises(openai.BadRequestError, match="not a JSON Schema"):
        client.chat.completions.create(model="production", messages=ASK, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})  # fmt: skip
    ok = client.chat.completions.create(model="production", messages=ASK, max_tokens=4, user="u-1", presence_penalty=0)
    assert ok.choices[0].message.role == "assistant"  # fields OpenAI clients commonly send are accepted


def test_response_format_json_schema_holds_where_the_free_model_does_not(served):
    client, _ = served
    schema = {**UNIT, "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "unit", "schema": schema, "strict": True}}
    free_valid = 0
    for i in range(4):
        messages = [{"role": "user", "content": f"Pick a unit for report {i}."}]
        r = client.chat.completions.create(model="production", messages=messages, max_tokens=64, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        obj = client.chat.completions.create(model="production", messages=messages, max_tokens=64, response_format={"type": "json_object"},
                                             temperature=0.7, seed=i)  # fmt: skip
        if obj.choices[0].finish_reason == "stop":  # an open object may run past max_tokens; a finished one is an object
            assert isinstance(json.loads(obj.choices[0].message.content), dict)
        free = client.chat.completions.create(model="production", messages=messages, max_tokens=64)
        try:
            jsonschema.validate(json.loads(free.choices[0].message.content), schema)
            free_valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError):
            pass
    assert free_valid == 0  # the random model on its own never writes it


def test_task_success_through_the_openai_client_equals_the_eval_stages(served):
    """The eval stage's quality pass (greedy, multi-step examples played out against the task's tools)
    and the same examples through the client, tools sent as OpenAI `tools`: the same answers and verdicts."""
    from stillroom import metrics
    from stillroom.examples.toolcall.task import ToolCallTask
    from stillroom.served_eval import play
    from stillroom.stages.evaluate import quality_pass
    from stillroom.teachers import HFTeacher

    client, run = served
    task = ToolCallTask()
    examples = task.build_examples(40, {"core": 0.5, "failure": 0.25, "long_tail": 0.25}, seed=0, held_out_functions=6)
    picked = [next(e for e in examples if e["slice"] == s) for s in ("single_call", "multi_step", "no_tool", "unsafe", "unicode")]
    student = HFTeacher.load(str(run / "train" / "model"))
    rows, _, _ = quality_pass("student", student, task.student_messages, picked, 1, 24, {"task_success": metrics.build("task_success")}, 4)
    through = [play(client, "production", task, e, 24, 4) for e in picked]
    assert [r["output"] for r in through] == [r["output"] for r in rows]
    assert [(r["passed"], r["reason"]) for r in through] == [(bool(r["metrics"]["task_success"]), r["reason"]) for r in rows]
