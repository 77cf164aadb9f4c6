"""A served OpenAI request (tools, assistant tool_calls, tool turns with tool_call_id) reaches the student
as exactly the messages the run's task rendered for it in training, and the cascade's teacher sees the
same tools. No model: the request models and the tasks' rendering only."""

from __future__ import annotations

import json

import pytest

from stillroom import chat_data
from stillroom.chat_task import ChatTask
from stillroom.chat_wire import ChatRequest, as_text, reply
from stillroom.examples.toolcall.task import ToolCallTask
from stillroom.served_eval import openai_conversation


def _request(messages: list[dict], tools: list[dict], **extra) -> ChatRequest:
    return ChatRequest.model_validate({"model": "production", "messages": messages, "tools": tools, **extra})


def test_a_multi_step_toolcall_conversation_renders_as_the_student_trained_on_it():
    task = ToolCallTask()
    examples = task.build_examples(60, {"core": 1.0}, seed=0, held_out_functions=6)
    e = next(x for x in examples if x["slice"] == "multi_step")
    first_call, result = e["reference_trace"][0], e["reference_trace"][1]
    call = json.loads(first_call["content"].removeprefix("<tool_call>").removesuffix("</tool_call>"))
    wire = openai_conversation(e) + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": result["content"].removeprefix("<tool_response>").removesuffix("</tool_response>")},
    ]  # fmt: skip
    req = _request(wire, e["tools"])
    served = task.served_messages(req.conversation(), req.offered(), {})
    assert served == task.student_messages(e) + e["reference_trace"][:2]
    # the cascade escalates with the same tools, in the teacher's context
    assert task.with_teacher_context(served)[-3] == task.student_messages(e)[-1]
    # a client that wrote the result in our format itself is not wrapped twice
    wire[-1]["content"] = result["content"]
    again = _request(wire, e["tools"])
    assert task.served_messages(again.conversation(), again.offered(), {}) == served


def test_a_chat_run_renders_served_tools_into_its_student_system_prompt():
    task = ChatTask()
    tools = [{"type": "function", "function": {"name": "get_order", "description": "Look up an order.",
              "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]  # fmt: skip
    messages = [{"role": "system", "content": "the client's own"}, {"role": "user", "content": "Where is A1?"},
                {"role": "assistant", "content": None, "tool_calls": [{"name": "get_order", "arguments": {"order_id": "A1"}}]},
                {"role": "tool", "content": '{"status": "shipped"}'}]  # fmt: skip
    example = {"messages": messages, "system": {"student": chat_data.system_prompt("Support.", tools)}}
    req = _request(openai_conversation(example), tools)
    assert task.served_messages(req.conversation(), req.offered(), {"student_system": "Support."}) == task.student_messages(example)
    kept = task.served_messages(req.conversation(), req.offered(), {"student_system": None})  # a run that kept each row's own
    assert kept[0]["content"] == chat_data.system_prompt("the client's own", tools)


def test_a_reply_turns_calls_into_tool_calls_and_back_into_the_same_text():
    call = '<tool_call>{"name": "get_order", "arguments": {"order_id": "A1"}}</tool_call>'
    message, finish = reply(call, True, True, "auto")
    assert finish == "tool_calls" and message["content"] is None
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {"order_id": "A1"}
    assert as_text(message) == call
    assert reply("Sure. " + call, True, True, "auto")[0]["content"] == "Sure."
    broken = '<tool_call>{"name": "get_order", "arguments": {"order_id": </tool_call>'
    assert reply(broken, True, True, "auto") == ({"role": "assistant", "content": broken}, "stop")  # as written: the client sees it
    assert reply(call, True, True, "none") == ({"role": "assistant", "content": ""}, "stop")
    assert reply(call, True, False, "auto") == ({"role": "assistant", "content": call}, "stop")  # no tools offered: text, as before


@pytest.mark.parametrize("body, words", [
    ({"stop": ["\n"]}, "stop: unknown field"),
    ({"logit_bias": {"1": 2}}, "logit_bias: unknown field"),
    ({"frequency_penalty": 0.5}, "penalties are not supported"),
    ({"tool_choice": "required"}, "no tools are offered"),
    ({"response_format": {"type": "json_schema"}}, "json_schema is given exactly when"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}, "only assistant turns make tool calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "must be a JSON object"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function", "function": {"name": "f"}}]}, "offered twice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "name"),
])  # fmt: skip
def test_requests_the_server_cannot_honour_are_refused_with_the_reason(body, words):
    from pydantic import ValidationError

    from stillroom.serve import _problem

    with pytest.raises(ValidationError) as err:
        ChatRequest.model_validate({"model": "production", "messages": [{"role": "user", "content": "hi"}], **body})
    said = "; ".join(_problem({**e, "loc": ("body", *e["loc"])}) for e in err.value.errors())
    assert words in said, said


def test_an_assistant_message_echoed_back_by_the_sdk_is_accepted():
    echoed = {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None, "function_call": None,
              "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}  # fmt: skip
    req = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}, echoed,
                                                                 {"role": "tool", "tool_call_id": "call_1", "content": "{}"}],
                                      "user": "u", "presence_penalty": 0, "max_completion_tokens": 9})  # fmt: skip
    assert req.new_tokens == 9 and req.conversation()[1]["tool_calls"] == [{"name": "f", "arguments": {}}]
