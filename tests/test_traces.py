"""Multi-step tool traces: the deterministic tools, the trace checker and verifier, episodes played out
against the tools, and the assistant-only training rows."""

import json

import pytest

from stillroom import rollout
from stillroom.examples.toolcall import tools
from stillroom.examples.toolcall.task import ToolCallTask, check_trace
from stillroom.generation import Generated
from stillroom.plugins import registry

TASK = ToolCallTask()


@pytest.fixture(scope="module")
def multi_step():
    ex = [e for e in TASK.build_examples(300, {"core": 1.0}, 0, 6) if e["slice"] == "multi_step"]
    assert len(ex) >= 20
    return ex


def test_tools_are_deterministic_and_never_shadow_catalog_functions(multi_step):
    assert not set(tools.SPECS) & set(TASK.by_name)
    call = {"name": "find_order", "arguments": {"customer": "Ana Lima"}}
    assert tools.run(call) == tools.run(json.loads(json.dumps(call)))
    assert tools.run({"name": "find_order", "arguments": {"customer": "ana  LIMA"}}) == tools.run(call)  # same customer
    assert "error" in tools.run({"name": "find_order", "arguments": {}})
    assert "error" in tools.run({"name": "no_such_tool", "arguments": {}})
    for e in multi_step:  # the reference trace is what the tools return, and the checker accepts it
        trace = e["reference_trace"]
        calls = [json.loads(m["content"][len("<tool_call>") : -len("</tool_call>")]) for m in trace[0:4:2]]
        assert calls == e["expected"]["calls"]
        assert [m["content"] for m in trace[1:4:2]] == [tools.result_message(tools.run(c))["content"] for c in calls]
        assert TASK.check(e, trace).passed
        assert {c["name"] for c in calls} <= {t["function"]["name"] for t in e["tools"]}


def test_trace_checker_names_each_way_to_fail(multi_step):
    e = multi_step[0]
    exp, ref = e["expected"], e["reference_trace"]
    final = ref[-1]

    def turns(*contents):
        return [{"role": "assistant", "content": c} for c in contents]

    first, second = ref[0]["content"], ref[2]["content"]
    assert check_trace(exp, ref).reason == "ok"
    assert check_trace(exp, turns("I'll do that.")).reason == "no_call_made"
    assert check_trace(exp, turns("<tool_call>{bad json</tool_call>")).reason == "malformed_call"
    assert check_trace(exp, turns(first, "All done.")).reason == "stopped_after_lookup"
    assert check_trace(exp, turns(second)).reason == "wrong_function"
    wrong_arg = first.replace(json.dumps(list(exp["calls"][0]["arguments"].values())[0]), '"Nobody"')
    assert check_trace(exp, turns(wrong_arg)).reason == "wrong_arguments"
    wrong_link = second.replace(json.dumps(list(exp["calls"][1]["arguments"].values())[0]), '"XX-0000"')
    assert check_trace(exp, turns(first, wrong_link, final["content"])).reason == "wrong_arguments_after_lookup"
    assert check_trace(exp, turns(first, second)).reason == "no_final_answer"
    assert check_trace(exp, turns(first, second, "Done, all set.")).reason == "final_answer_inconsistent"
    assert check_trace(exp, turns(first, second, second)).reason == "extra_calls"
    # the verifier reads a candidate's turns; the format verifier checks each step's call
    trace_v, format_v = registry().get("verifier", "trace")(), registry().get("verifier", "tool_call")()
    assert trace_v(e, {"text": "", "messages": ref}).passed
    assert not trace_v(e, {"text": first, "messages": turns(first)}).passed
    assert format_v(e, {"text": "", "messages": ref}).passed
    assert not format_v(e, {"text": "", "messages": turns(first, "<tool_call>{oops</tool_call>")}).passed


def scripted(replies_of):
    """A completer that answers each conversation from a script keyed by its first user turn and step."""
    seen = []

    def complete(indices, convs, step):
        seen.append((list(indices), step))
        out = []
        for conv in convs:
            text = replies_of(conv, step)
            out.append(Generated(text, [1] * (step + 2), len(conv), True, [-0.5] * (step + 3)))
        return out

    return complete, seen


def test_episodes_feed_tool_results_back_until_the_answer(multi_step):
    single = [e for e in TASK.build_examples(40, {"core": 1.0}, 0, 6) if e["slice"] == "single_call"][0]
    examples = [multi_step[0], single, multi_step[1]]

    def replies(conv, step):
        ex = next(e for e in examples if conv[1]["content"].endswith(e["request"]))
        if ex is single:
            return ex["reference"]
        assistant = [m for m in ex["reference_trace"] if m["role"] == "assistant"]
        assert [m for m in conv[2:]] == ex["reference_trace"][: 2 * step]  # the tool results came back in order
        return assistant[step]["content"]

    complete, seen = scripted(replies)
    episodes = rollout.run(complete, TASK, examples, [TASK.student_messages(e) for e in examples], max_steps=4)
    assert episodes[0].messages == multi_step[0]["reference_trace"] and episodes[2].messages == multi_step[1]["reference_trace"]
    assert not episodes[1].multi_turn and episodes[1].combined().text == single["reference"]
    assert seen == [([0, 1, 2], 0), ([0, 2], 1), ([0, 2], 2)]  # finished conversations leave the batch
    assert all(TASK.check(e, ep.messages if ep.multi_turn else ep.combined().text).passed for e, ep in zip(examples, episodes))
    merged = episodes[0].combined()
    assert merged.token_logprobs == [-0.5] * (3 + 4 + 5) and merged.topk_ids is None and merged.text.count("<tool_call>") == 2
    # the step budget ends an episode that keeps calling
    looping, _ = scripted(lambda conv, step: multi_step[0]["reference_trace"][0]["content"])
    ep = rollout.run(looping, TASK, multi_step[:1], [TASK.student_messages(multi_step[0])], max_steps=3)[0]
    assert len(ep.turns) == 3 and ep.messages[-1]["role"] == "assistant"
    assert TASK.check(multi_step[0], ep.messages).reason == "wrong_function_after_lookup"  # the lookup again, not the action


def test_trace_rows_put_labels_on_the_assistant_turns_only(tiny_model_dir, multi_step):
    from transformers import AutoTokenizer

    from stillroom import generation
    from stillroom.stages.train import encode_turns

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    e = multi_step[0]
    prompt = TASK.student_messages(e)
    row = encode_turns(tokenizer, prompt, e["reference_trace"], 4096, 1.0)
    full = tokenizer(generation.render(tokenizer, prompt + e["reference_trace"])[: -len("<|im_start|>assistant\n")],
                     add_special_tokens=False)["input_ids"]  # fmt: skip
    assert row["ids"] == full[: len(row["ids"])] and len(full) - len(row["ids"]) == 1  # all but the final newline
    eot = generation.end_of_turn_id(tokenizer)
    labelled = [t for t in row["labels"] if t != -100]
    spans, cur = [], []
    for t in labelled:
        cur.append(t)
        if t == eot:
            spans.append(tokenizer.decode(cur[:-1]))
            cur = []
    assert spans == [m["content"] for m in e["reference_trace"] if m["role"] == "assistant"]
    assert "tool_response" not in tokenizer.decode(labelled) and "Request:" not in tokenizer.decode(labelled)
