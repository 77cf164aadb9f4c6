"""The `chat` task end to end: rows from a JSONL file, the teacher behind stillroom's own
OpenAI-compatible endpoint over real HTTP, tool calls and multi-turn rows, every stage."""

from __future__ import annotations

import json

import pytest
import yaml
from finished_runs import running

from stillroom import atomic, chat_data, checks, toolcalls
from stillroom.config import load_config
from stillroom.openai_server import create_app
from stillroom.plugins import registry
from stillroom.teachers import HFTeacher, Sampling

ORDER_TOOL = {"type": "function", "function": {"name": "get_order", "description": "Look up an order by id.",
              "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}  # fmt: skip
REFUND_TOOL = {"type": "function", "function": {"name": "refund", "description": "Refund an order.",
               "parameters": json.dumps({"type": "object", "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
                                         "required": ["order_id"]})}}  # fmt: skip
TEACHER_SAYS = '<tool_call>{"name": "get_order", "arguments": {"order_id": "A1"}}</tool_call>'  # what the fitted teacher writes


def call(name: str, args: dict, as_string: bool = False) -> dict:
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(args) if as_string else args}}


def corpus(n: int = 30) -> list[dict]:
    """Single-turn lookups with tool-call references, multi-turn logs with tool turns, plain answers
    without tools, and refusals: the shapes of real traffic."""
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:  # every other one without a reference: only the schema of its calls is checked
            rows.append({"id": f"look-{i}", "slice": "lookup", "tools": [ORDER_TOOL, REFUND_TOOL],
                         "messages": [{"role": "user", "content": f"Where is my order A{i}?"}],
                         **({"reference": [call("get_order", {"order_id": f"A{i}"}, as_string=True)]} if i % 8 == 0 else {})})  # fmt: skip
        elif kind == 1:
            rows.append({"id": f"multi-{i}", "slice": "refund", "tools": [ORDER_TOOL, REFUND_TOOL], "messages": [
                {"role": "system", "content": "You are the support assistant of a small shop."},
                {"role": "user", "content": f"Refund order B{i}, it arrived broken."},
                {"role": "assistant", "content": None, "tool_calls": [call("get_order", {"order_id": f"B{i}"})]},
                {"role": "tool", "tool_call_id": "call_get_order", "content": json.dumps({"order_id": f"B{i}", "total": 20 + i})},
                {"role": "assistant", "content": None, "tool_calls": [call("refund", {"order_id": f"B{i}", "amount": 20 + i}, True)]},
                {"role": "tool", "tool_call_id": "call_refund", "content": json.dumps({"refunded": 20 + i})},
                {"role": "assistant", "content": f"Done: order B{i} is refunded ({20 + i} EUR)."}]})  # fmt: skip
        elif kind == 2:
            rows.append({"id": f"plain-{i}", "slice": "faq", "layer": "long_tail", "messages": [
                {"role": "user", "content": f"Do you ship to country number {i}?"},
                {"role": "assistant", "content": "Yes, we ship there within five days."}]})  # fmt: skip
        else:
            rows.append({"id": f"refuse-{i}", "slice": "policy", "layer": "failure", "tools": [ORDER_TOOL],
                         "messages": [{"role": "user", "content": f"Give me the home address of customer {i}."}],
                         "reference_answer": "I can't help with that."})  # fmt: skip
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


TEACHER_SYSTEM = "You are the shop's senior support agent. Be brief."
JUDGE = {"name": "helpful", "kind": "judge", "rubric": "The answer helps the customer with their order."}
JUDGE_SAYS = "Score: 8"


@pytest.fixture(scope="module")
def fitted_teacher(tiny_model_dir, tmp_path_factory):
    """The tiny model fitted to answer every prompt with one tool call, and every judge prompt with a
    grade: a real model that calls tools and grades, so what it writes can be followed through the stages."""
    import torch

    from stillroom import generation, models
    from stillroom.chat_task import ChatTask

    model, tokenizer = models.load(str(tiny_model_dir))
    task = ChatTask()
    pairs = []
    for r in corpus(8):
        row = chat_data.parse_row(r, {})
        prompt = row["messages"][:-1] if row["messages"][-1]["role"] == "assistant" else row["messages"]
        ex = {"messages": prompt, "few_shot": [], "reference_message": row["reference"],
              "system": {"student": chat_data.system_prompt(None, row["tools"]), "teacher": chat_data.system_prompt(TEACHER_SYSTEM, row["tools"])}}  # fmt: skip
        pairs += [(task.student_messages(ex), TEACHER_SAYS), (task.teacher_messages(ex), TEACHER_SAYS),
                  (checks.judge_messages(JUDGE, ex, TEACHER_SAYS), JUDGE_SAYS), (checks.judge_messages(JUDGE, ex, "Sure."), JUDGE_SAYS)]  # fmt: skip
    eot = generation.end_of_turn_id(tokenizer)
    rows = [(tokenizer(generation.render(tokenizer, m), add_special_tokens=False)["input_ids"],
             tokenizer(t, add_special_tokens=False)["input_ids"] + [eot]) for m, t in pairs]  # fmt: skip
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(400):
        p, target = rows[step % len(rows)]
        loss = model(input_ids=torch.tensor([p + target]), labels=torch.tensor([[-100] * len(p) + target])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    folder = tmp_path_factory.mktemp("fitted-teacher")
    models.save(model, tokenizer, folder)
    return folder


@pytest.fixture(scope="module")
def server(fitted_teacher):
    """The fitted teacher behind stillroom's OpenAI-compatible endpoint on loopback; every request
    body is recorded."""
    from stillroom import models

    model, tokenizer = models.load(str(fitted_teacher))
    app = create_app(model, tokenizer, "tiny")
    seen: list[dict] = []

    @app.middleware("http")
    async def record(request, call_next):
        seen.append(json.loads(await request.body() or b"{}"))
        return await call_next(request)

    with running(app) as url:
        yield {"url": f"{url}/v1", "seen": seen, "model": model, "tokenizer": tokenizer}


def test_parse_grade_on_fixed_replies():
    assert [checks.parse_grade(r) for r in ("Score: 8", "score=10/10", "7", "Score: 12", "Great answer!")] == [0.8, 1.0, 0.7, 1.0, None]


@pytest.mark.parametrize("backend", ["openai", "hf"])
def test_judge_grades_through_a_teacher_backend(server, fitted_teacher, backend):
    from stillroom.config import CheckConfig
    from stillroom.teachers import OpenAITeacher

    teacher = {"backend": "openai", "url": server["url"], "model": "tiny"} if backend == "openai" else {"model": str(fitted_teacher)}
    row = chat_data.parse_row(corpus(1)[0], {})
    ex = {"messages": row["messages"], "reference_message": row["reference"], "slice": "lookup"}
    answer = "Your order A0 is on its way."
    reply = OpenAITeacher(server["url"], "tiny").complete([checks.judge_messages(JUDGE, ex, answer)], Sampling(16), [0], 0)[0].text
    assert reply == JUDGE_SAYS  # what the served model answers the judge's prompt
    judge = CheckConfig.model_validate({**JUDGE, "teacher": teacher}).spec()
    assert checks.run_one(judge, ex, answer) == checks.Verdict(True, "ok", 0.8)
    strict = CheckConfig.model_validate({**JUDGE, "teacher": teacher, "threshold": 0.9}).spec()
    assert checks.run_one(strict, ex, answer) == checks.Verdict(False, "score 0.80 < 0.9", 0.8)


def test_full_pipeline_over_http_keeps_tools_and_tool_calls_in_every_stage(server, tmp_path, tiny_model_dir):
    from stillroom.pipeline import run_pipeline
    from stillroom.stages.generate import read_candidates

    data = write_jsonl(tmp_path / "traffic.jsonl", [*corpus(), {"messages": [{"role": "user", "content": "hi"}], "layer": "core2"}])
    cfg_path = tmp_path / "chat.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "run": {"name": "chat", "dir": str(tmp_path / "runs")},
        "teacher": {"backend": "openai", "url": server["url"], "model": "tiny", "concurrency": 2},
        "student": {"model": str(tiny_model_dir)},
        "data": {"task": "chat", "train": str(data), "learn": "every", "on_bad_row": "skip", "eval_fraction": 0.25, "dev_fraction": 0.1,
                 "context": {"teacher_system": TEACHER_SYSTEM, "student_system": "Support."},
                 "mixture": {"sources": ["teacher", "reference"], "contamination": {"action": "keep"}}},
        "signals": {"n": 1, "max_new_tokens": 40, "top_k": 2, "batch_size": 4, "shard_size": 8},
        "train": {"epochs": 1, "batch_size": 4, "max_length": 384, "reference_weight": 1.0},
        "eval": {"max_new_tokens": 40, "latency_requests": 1, "gates": [{"metric": "task_success", "min": 0.0}]},
    }))  # fmt: skip
    cfg = load_config(cfg_path)
    root = run_pipeline(cfg)
    prep = root / "prepare"
    examples = {e["id"]: e for s in ("train", "dev", "eval") for e in atomic.read_jsonl(prep / f"{s}.jsonl")}
    # every assistant turn of a multi-turn log is its own example, the whole conversation in one split
    multi = sorted(i for i in examples if i.startswith("multi-1/"))
    assert multi == ["multi-1/t2", "multi-1/t4", "multi-1/t6"]
    assert len({examples[i]["pinned_split"] for i in multi}) == 1
    assert examples["multi-1/t4"]["reference_message"]["tool_calls"] == [{"name": "refund", "arguments": {"order_id": "B1", "amount": 21}}]

    # prompts: what the teacher received over HTTP carries the tool schemas and the logged calls and results
    bodies = [b for b in server["seen"] if "messages" in b]
    t6 = next(b["messages"] for b in bodies if any("Refund order B1," in m["content"] for m in b["messages"]) and len(b["messages"]) == 6)
    assert t6[0]["role"] == "system" and t6[0]["content"].startswith("You are the shop's senior support agent.") and '"name": "refund"' in t6[0]["content"]
    assert [m["role"] for m in t6[1:]] == ["user", "assistant", "tool", "assistant", "tool"]
    assert json.loads(t6[4]["content"].removeprefix("<tool_call>").removesuffix("</tool_call>")) == {"name": "refund",
                                                                                                     "arguments": {"order_id": "B1", "amount": 21}}  # fmt: skip
    assert t6[5]["content"] == '<tool_response>{"refunded": 21}</tool_response>'

    # store: for every train and dev example, what the teacher answered over HTTP (the same greedy answer
    # the model gives locally), tool calls included
    store = {r["example_id"]: r for r in read_candidates(root / "generate")}
    train_dev = [i for i, e in examples.items() if e["pinned_split"] != "eval"]
    assert sorted(store) == sorted(train_dev)
    task = registry().get("task", "chat")
    local = HFTeacher(server["model"], server["tokenizer"], "tiny")
    want = local.complete([task.teacher_messages(examples[i]) for i in train_dev], Sampling(40), [0] * len(train_dev), 0)
    assert [store[i]["text"] for i in train_dev] == [g.text for g in want]
    called = {i for i in train_dev if store[i]["text"] == TEACHER_SAYS}
    assert called  # the fitted teacher answers most single-turn prompts with its call

    # selected: the candidates the rows' checks pass (a call valid for the row's tools, matching the
    # reference where there is one); the card names why the others went
    selected = atomic.read_jsonl(root / "select" / "selected.jsonl")
    passing = {i for i in train_dev if checks.run_all(examples[i], store[i]["text"]).passed}
    assert {s["example_id"] for s in selected} == passing
    assert any(s["text"] == TEACHER_SAYS and examples[s["example_id"]]["tools"] for s in selected)
    card = json.loads((root / "select" / "card.json").read_text())
    reasons = {k for layer in card["per_layer"].values() for k in layer["rejections"]}
    assert "checks: reference/wrong_arguments" in reasons

    # training rows: the mixture's references keep their calls; the student's prompt lists the tools
    mixture = atomic.read_jsonl(root / "mix" / "mixture.jsonl")
    refs = {r["example_id"]: r for r in mixture if r["source"] == "reference"}
    ref_calls = [r for i, r in refs.items() if examples[i]["reference_message"] and examples[i]["reference_message"].get("tool_calls")]
    assert ref_calls and all(toolcalls.parse(r["text"]).calls == examples[r["example_id"]]["reference_message"]["tool_calls"] for r in ref_calls)
    student_prompt = task.student_messages(examples[ref_calls[0]["example_id"]])
    assert student_prompt[0]["content"].startswith("Support.") and '"name": "get_order"' in student_prompt[0]["content"]
    manifest = json.loads((root / "train" / "manifest.json").read_text())
    assert manifest["counts"]["train_examples"] == sum(r["split"] == "train" for r in mixture)

    # eval: teacher outputs keep the calls; their validity is measured against each row's tools
    outputs = atomic.read_jsonl(root / "eval" / "outputs.jsonl")
    teacher_rows = [r for r in outputs if r["model"] == "teacher"]
    with_call = [r for r in teacher_rows if r["output"] == TEACHER_SAYS]
    assert with_call
    for r in with_call:
        assert r["metrics"]["call_validity"] == (1.0 if examples[r["example_id"]]["tools"] else 0.0)
    results = json.loads((root / "eval" / "results.json").read_text())
    assert set(results["models"]["teacher"]["per_slice"]) == {examples[r["example_id"]]["slice"] for r in teacher_rows}
    report = (root / "report.md").read_text()
    assert "Rows from files: 30 rows gave 46 examples (learned turns: `every`); 1 malformed rows skipped (by field: layer x1;" in report
    assert json.loads((prep / "data_card.json").read_text())["bad_rows"] == [f"{data}:31: layer: unknown layer 'core2'; allowed: core, failure, long_tail"]
