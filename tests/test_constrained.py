"""Constrained decoding (xgrammar) on a tiny model with random weights: whatever the model would say, the
grammar holds every finished output to the format (a JSON schema, the offered tools' schemas, or no call
at all), greedy and sampled, while the same model unconstrained never writes it; and the eval stage
measures the student with and without the constraint in one run."""

from __future__ import annotations

import json

import pytest

from stillroom import constrained, generation, models, toolcalls

pytest.importorskip("xgrammar")

UNIT = {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "metric": {"type": "boolean"}},
        "required": ["unit", "metric"], "additionalProperties": False}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "set_unit", "description": "Set the unit.", "parameters": UNIT}},
    {"type": "function", "function": {"name": "lights", "description": "Lights.",
                                      "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]}}},
]  # fmt: skip
CONSTRAINTS = {
    "json_schema": {"type": "json_schema", "schema": UNIT},
    "one_call": constrained.for_tools(TOOLS, "required", parallel=False),
    "named": constrained.for_tools(TOOLS, name="lights", parallel=False),
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load(str(tiny_model_dir))


def _prompts(tokenizer, n: int) -> list[str]:
    return [generation.render(tokenizer, [{"role": "user", "content": f"Request number {i}: set it up."}]) for i in range(n)]


def test_the_structural_tags_accept_what_the_schemas_accept_and_refuse_the_rest(tiny):
    import xgrammar as xgr

    _, tokenizer = tiny
    call = '<tool_call>{"name": "set_unit", "arguments": {"unit": "celsius", "metric": true}}</tool_call>'
    cases = {  # constraint -> (accepted, refused)
        "one_call": ([call], ['<tool_call>{"name": "set_unit", "arguments": {"unit": "kelvin", "metric": true}}</tool_call>',
                              '<tool_call>{"name": "launch", "arguments": {}}</tool_call>', "plain text", call + call]),
        "json_schema": (['{"unit": "fahrenheit", "metric": false}'], ['{"unit": "fahrenheit"}', '{"unit": "c", "metric": 1}']),
    }  # fmt: skip
    for name, (good, bad) in cases.items():
        compiled = constrained.compile_for(tokenizer, tiny[0].config.vocab_size, CONSTRAINTS[name])
        for text, want in [(t, True) for t in good] + [(t, False) for t in bad]:
            m = xgr.GrammarMatcher(compiled)
            assert (m.accept_string(text) and m.is_completed()) is want, (name, text)
            assert constrained.satisfied(CONSTRAINTS[name], text) is want, (name, text)
    auto = constrained.for_tools(TOOLS)
    assert constrained.satisfied(auto, "no call here") and constrained.satisfied(auto, "sure: " + call)
    assert not constrained.satisfied(constrained.for_tools(TOOLS, "none"), call)
    assert "not a JSON Schema" in constrained.problem({"type": "json_schema", "schema": {"type": 7}})


@pytest.mark.parametrize("sample", [False, True])
def test_a_random_model_writes_only_valid_output_under_the_constraint_and_never_without(tiny, sample):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, 4)
    kwargs = {"sample": True, "temperature": 0.9, "seeds": [11, 12, 13, 14]} if sample else {}
    for name, c in CONSTRAINTS.items():
        held = generation.generate(model, tokenizer, prompts, max_new_tokens=64, constraints=[c] * len(prompts), **kwargs)
        free = generation.generate(model, tokenizer, prompts, max_new_tokens=64, **kwargs)
        assert all(g.finished and constrained.satisfied(c, g.text) for g in held), (name, [g.text for g in held])
        assert not any(constrained.satisfied(c, g.text) for g in free), (name, [g.text for g in free])
        if name != "json_schema":
            calls = [json.loads(g.text.removeprefix("<tool_call>").removesuffix("</tool_call>")) for g in held]
            assert all(c_["name"] in {"set_unit", "lights"} for c_ in calls)
    # tool_choice none: the tools are there, a call never is
    none = constrained.for_tools(TOOLS, "none")
    held = generation.generate(model, tokenizer, prompts, max_new_tokens=24, constraints=[none] * len(prompts), **kwargs)
    assert all("<tool_call>" not in g.text for g in held)


def test_a_batch_mixes_constrained_and_free_rows_and_the_free_rows_are_unchanged(tiny):
    model, tokenizer = tiny
    prompts = _prompts(tokenizer, 3)
    free = generation.generate(model, tokenizer, prompts, max_new_tokens=64)
    mixed = generation.generate(model, tokenizer, prompts, max_new_tokens=64, constraints=[None, CONSTRAINTS["json_schema"], None])
    assert mixed[0].text == free[0].text and mixed[2].text == free[2].text
    assert constrained.satisfied(CONSTRAINTS["json_schema"], mixed[1].text)


def test_an_escalated_answer_is_held_to_the_same_constraint(tmp_path, tiny_model_dir):
    """A cascade whose threshold sends every request to the teacher: the teacher's answer meets the
    request's JSON schema too."""
    from finished_runs import make_run

    from stillroom import registry
    from stillroom.serve import answer, load_slot

    run = make_run(tmp_path, "up", 1, True, tiny_model_dir, {"threshold": 1.01, "signal": "mean_token_prob", "verifier": False})
    registry.register(tmp_path / "registry", run)
    slot = load_slot(registry.resolve(tmp_path / "registry", "v1"))
    a = answer(slot, [{"role": "user", "content": "Which unit?"}], 64, constraint=CONSTRAINTS["json_schema"])
    assert a.served_by == "teacher" and a.finished and constrained.satisfied(CONSTRAINTS["json_schema"], a.text)


def test_eval_measures_the_student_with_and_without_the_constraint(tiny_model_dir, tmp_path):
    """`eval.constrain: tools` on a finished tiny run: the student answers twice on the same examples,
    free and with its calls held to the offered tools; results carry both, the paired change and the
    per-token ratio, the report says it, and every finished constrained call is valid for its tools."""
    import subprocess
    import sys

    import yaml

    cfg = {
        "run": {"name": "c", "dir": str(tmp_path / "runs"), "seed": 0},
        "teacher": {"model": str(tiny_model_dir)},
        "student": {"pruned_from": "teacher", "keep_layers": 2},
        "data": {"n_examples": 24, "layer_weights": {"core": 0.5, "failure": 0.5}, "held_out_functions": 2},
        "signals": {"n": 1, "max_new_tokens": 12, "batch_size": 4, "shard_size": 8, "top_k": 0, "constrain": "tools"},
        "train": {"epochs": 1, "batch_size": 4, "max_length": 256},
        "eval": {"max_examples": 6, "max_new_tokens": 16, "latency_requests": 2, "constrain": "tools"},
    }  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "stillroom.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode in (0, 3), proc.stdout[-3000:] + proc.stderr[-3000:]  # 3: a random student fails its gates
    run = tmp_path / "runs" / "c"
    results = json.loads((run / "eval" / "results.json").read_text())
    assert {"student", "student_constrained"} <= set(results["models"])
    c = results["constrained_vs_student"]
    assert c["time_per_token_ratio"] > 0 and "task_success" in c["deltas"]
    examples = {json.loads(x)["id"]: json.loads(x) for x in (run / "prepare" / "eval.jsonl").read_text().splitlines()}
    rows = [json.loads(x) for x in (run / "eval" / "outputs.jsonl").read_text().splitlines()]
    held = [r for r in rows if r["model"] == "student_constrained"]
    assert len(held) == len([r for r in rows if r["model"] == "student"]) > 0
    for r in held:  # a call, where one was made and finished, names an offered tool with valid arguments
        tools = examples[r["example_id"]]["tools"]
        assert not any(toolcalls.schema_problems(call, tools) for call in toolcalls.parse(r["output"]).calls)
    assert "Constrained decoding" in (run / "report" / "report.md").read_text() or "Constrained decoding" in (
        run / "report" / "report.html").read_text()
