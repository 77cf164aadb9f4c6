import collections
import json

from stillroom.examples.toolcall.task import ToolCallTask, no_call, render_tool, tool_call
from stillroom.stages.prepare import split_of

WEIGHTS = {"core": 0.5, "failure": 0.25, "long_tail": 0.25}


def build(n=200, seed=0, held=6):
    return ToolCallTask().build_examples(n, WEIGHTS, seed, held)


def test_catalog_is_broad_and_valid():
    task = ToolCallTask()
    names = [t["function"]["name"] for t in task.catalog]
    assert len(names) >= 40 and len(set(names)) == len(names)
    assert len({t["x-domain"] for t in task.catalog}) >= 25
    for t in task.catalog:
        props = t["function"]["parameters"]["properties"]
        assert set(t["function"]["parameters"]["required"]) <= set(props)
        assert render_tool(t).startswith(t["function"]["name"] + "(")


def test_same_seed_same_examples_and_different_seed_differs():
    assert build(seed=3) == build(seed=3)
    assert build(seed=3) != build(seed=4)


def test_every_layer_and_slice_is_generated():
    ex = build(400)
    slices = collections.Counter((e["layer"], e["slice"]) for e in ex)
    expected = {
        ("core", "single_call"), ("failure", "no_tool"), ("failure", "missing_arg"), ("failure", "injection"),
        ("long_tail", "unicode"), ("long_tail", "numeric_edge"), ("long_tail", "date_edge"),
        ("long_tail", "rare_value"), ("long_tail", "long_request"),
    }  # fmt: skip
    assert expected <= set(slices), slices
    assert collections.Counter(e["layer"] for e in ex) == {"core": 200, "failure": 100, "long_tail": 100}


def test_reference_call_passes_its_own_checks_and_is_schema_valid():
    task = ToolCallTask()
    for e in build(300):
        if e["expected"]["kind"] == "call":
            assert task.check(e, e["reference"]).passed, e
            assert tool_call()(e, {"text": e["reference"]}).passed, e
            intended = e["expected"]["calls"][0]["name"]
            assert intended in {t["function"]["name"] for t in e["tools"]}


def test_growing_the_data_keeps_existing_examples_and_their_splits():
    small, big = build(100), build(120)
    big_by_id = {e["id"]: e for e in big}
    for e in small:
        assert big_by_id[e["id"]] == e
        assert split_of(e["id"], 0.2, 0.1) == split_of(big_by_id[e["id"]]["id"], 0.2, 0.1)


def test_held_out_functions_never_reach_training_prompts():
    task = ToolCallTask()
    held = task.held_out(6)
    assert len(held) == 6
    ex = build(400)
    pinned = [e for e in ex if "unseen_function" in e.get("tags", [])]
    assert pinned and all(e["pinned_split"] == "not_train" for e in pinned), "some examples should use held-out functions"
    for e in ex:
        offered = {t["function"]["name"] for t in e["tools"]}
        if e.get("pinned_split") != "not_train":
            assert not offered & held, e["id"]
        elif "unseen_function" in e.get("tags", []):
            intended = e["expected"]["calls"][0]["name"] if "calls" in e["expected"] else e["expected"]["function"]
            assert intended in held


def test_held_out_requests_of_the_fixed_pools_are_only_ever_evaluated():
    """The no-tool and unsafe requests come from fixed pools: a third of each pool is pinned to eval, the
    rest never reaches it, so a held-out refusal is never a request the model saw in training."""
    from stillroom.stages.prepare import split_for

    ex = [e for e in build(600) if e["slice"] in ("no_tool", "unsafe")]
    held = {e["request"] for e in ex if "unseen_request" in e.get("tags", [])}
    seen = {e["request"] for e in ex if "unseen_request" not in e.get("tags", [])}
    assert held and seen and not held & seen
    for e in ex:
        split = split_for(e, 0.3, 0.1)
        assert (split == "eval") == (e["request"] in held), e["id"]


def test_examples_kept_out_of_training_go_to_eval_or_to_eval_and_dev_by_config():
    """``data.not_train_split``: by default every held-out function and request is evaluated; with
    ``eval_and_dev`` the hash spreads them over eval and dev in proportion to the two fractions (so the
    dev fit sees them), and none ever lands in train; the rest of the split does not move."""
    from stillroom.stages.prepare import split_for

    ex = build(1200)
    kept = [e for e in ex if e.get("pinned_split") == "not_train"]
    assert {t for e in kept for t in e["tags"]} == {"unseen_function", "unseen_request"}
    assert all(split_for(e, 0.2, 0.1) == "eval" for e in kept)
    spread = collections.Counter(split_for(e, 0.2, 0.1, "eval_and_dev") for e in kept)
    assert set(spread) == {"eval", "dev"}
    assert abs(spread["dev"] / len(kept) - 1 / 3) < 0.08, spread  # dev 0.1 of the 0.3 held out
    assert all(split_for(e, 0.2, 0.0, "eval_and_dev") == "eval" for e in kept)  # no dev split: all held out
    rest = [e for e in ex if e.get("pinned_split") != "not_train"]
    assert [split_for(e, 0.2, 0.1) for e in rest] == [split_for(e, 0.2, 0.1, "eval_and_dev") for e in rest]


def test_training_sees_many_distinct_no_call_and_refusal_requests():
    """With 11 distinct no-call questions in training, the demo's distilled student learnt those 11
    answers instead of the rule (it opened all 4 held-out ones checked with a call): the pools must be wide
    enough that the training side alone holds dozens of distinct requests, none of them also held out."""
    from stillroom.examples.toolcall.task import NO_TOOL_REQUESTS, UNSAFE_REQUESTS, held_out_request

    for pool in (NO_TOOL_REQUESTS, UNSAFE_REQUESTS):
        assert len(set(pool)) == len(pool)
        trained = [r for r in pool if not held_out_request(r)]
        assert len(trained) >= 25 and len(pool) - len(trained) >= 20, (len(trained), len(pool))
    ex = [e for e in build(1400) if e["slice"] in ("no_tool", "unsafe") and "unseen_request" not in e.get("tags", [])]
    for slice_ in ("no_tool", "unsafe"):
        assert len({e["request"] for e in ex if e["slice"] == slice_}) >= 20, slice_


def test_check_distinguishes_failure_kinds():
    task = ToolCallTask()
    ex = build(300)
    call = next(e for e in ex if e["slice"] == "injection")
    want = call["expected"]["calls"][0]
    forbidden = call["expected"]["forbidden"][0]
    wrong_args = {"name": want["name"], "arguments": {**want["arguments"], "zzz": 1}}
    fmt = lambda c: "<tool_call>" + json.dumps(c) + "</tool_call>"  # noqa: E731
    assert task.check(call, fmt(want)).passed
    assert task.check(call, fmt(wrong_args)).reason == "wrong_arguments"
    assert task.check(call, fmt({"name": forbidden, "arguments": {}})).reason == "followed_injection"
    assert task.check(call, "<tool_call>{not json</tool_call>").reason == "malformed_call"
    assert task.check(call, "Sure!").reason == "no_call_made"
    # string arguments compare case- and whitespace-insensitively
    loose = {"name": want["name"], "arguments": {k: (f"  {v.upper()} " if isinstance(v, str) else v) for k, v in want["arguments"].items()}}
    assert task.check(call, fmt(loose)).passed
    no_tool = next(e for e in ex if e["slice"] == "no_tool")
    assert task.check(no_tool, "Octopuses have three hearts.").passed
    assert task.check(no_tool, fmt(want)).reason == "called_when_it_should_not"
    ask = next(e for e in ex if e["slice"] == "missing_arg")
    assert task.check(ask, "Which city do you mean?").passed
    assert task.check(ask, "Done.").reason == "did_not_ask_for_missing_argument"


def test_tool_call_verifier_checks_schema():
    ex = next(e for e in build(100) if e["slice"] == "single_call")
    want = ex["expected"]["calls"][0]
    bad_type = {"name": want["name"], "arguments": {k: ["list"] for k in want["arguments"]}}
    verify = tool_call()
    v = verify(ex, {"text": "<tool_call>" + json.dumps(bad_type) + "</tool_call>"})
    assert not v.passed and v.reason.startswith("schema:")
    v = verify(ex, {"text": '<tool_call>{"name": "not_offered", "arguments": {}}</tool_call>'})
    assert not v.passed and "unknown function" in v.reason
    no_tool = next(e for e in build(300) if e["slice"] == "no_tool")
    assert verify(no_tool, {"text": "anything"}).reason == "n/a"
    assert no_call()(no_tool, {"text": "Octopuses have three hearts."}).passed
    assert no_call()(no_tool, {"text": "<tool_call>{}</tool_call>"}).reason == "unexpected_call"
    assert no_call()(ex, {"text": "x"}).reason == "n/a"


def test_student_prompt_drops_the_few_shot_context():
    task = ToolCallTask()
    e = build(10)[0]
    teacher, student = task.teacher_messages(e), task.student_messages(e)
    assert len(teacher) > len(student) == 2
    assert teacher[-1] == student[-1]


def test_unsafe_requests_must_be_declined_and_alarming_benign_ones_served():
    from stillroom import metrics
    from stillroom.examples.toolcall.task import REFUSAL

    task = ToolCallTask()
    examples = task.build_examples(400, {"failure": 1.0}, 0, 0)
    unsafe = [e for e in examples if e["slice"] == "unsafe"]
    benign = [e for e in examples if e["slice"] == "sensitive_benign"]
    assert unsafe and benign
    e = unsafe[0]
    assert e["expected"] == {"kind": "refuse"} and e["reference"] == REFUSAL
    assert task.check(e, REFUSAL).passed
    assert task.check(e, "Sure, done!").reason == "unsafe_compliance"
    call = '<tool_call>{"name": "%s", "arguments": {}}</tool_call>' % e["tools"][0]["function"]["name"]
    assert task.check(e, call).reason == "unsafe_compliance"
    b = benign[0]
    assert b["expected"]["kind"] == "call" and task.check(b, b["reference"]).passed
    # the metrics read the same judgement: declining a benign request is over-refusal, complying with an unsafe one is not safe
    over, unsafe_m = metrics.over_refusal(), metrics.unsafe_compliance()
    assert over(b, {"text": REFUSAL}) == 1.0 and over(b, {"text": b["reference"]}) == 0.0 and over(e, {"text": REFUSAL}) is None
    assert unsafe_m(e, {"text": "Sure, done!"}) == 1.0 and unsafe_m(e, {"text": REFUSAL}) == 0.0 and unsafe_m(b, {"text": ""}) is None
