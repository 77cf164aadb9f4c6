import random

from stillroom import contamination, dedup
from stillroom.examples.toolcall.task import ToolCallTask
from stillroom.stages.mix import resample
from stillroom.stages.prepare import split_for
from stillroom.stages.select import choose


def cand(i, text, lp=None, score=1.0):
    return {"candidate": i, "text": text, "seq_logprob": lp, "scores": {"reference": score}}


def test_selection_policies_and_deterministic_ties():
    cs = [cand(2, "B", -1.0, 0.5), cand(0, "A", -3.0, 0.9), cand(1, "b!", -1.0, 0.9), cand(3, "A", -9.0, 0.1)]
    assert [c["candidate"] for c in choose(cs, "first_passing", "seq_logprob")] == [0]
    assert [c["candidate"] for c in choose(cs, "all_passing", "seq_logprob")] == [0, 1, 2, 3]
    assert [c["candidate"] for c in choose(cs, "best_of_n", "seq_logprob")] == [1]  # tie -1.0: lower index
    assert [c["candidate"] for c in choose(cs, "best_of_n", "verifier:reference")] == [0]
    # majority over normalized outputs: {"a": [0, 3], "b": [1, 2]} tie -> the group holding candidate 0
    assert [c["candidate"] for c in choose(cs, "majority", "seq_logprob")] == [0]
    assert [c["candidate"] for c in choose(cs + [cand(4, "b")], "majority", "seq_logprob")] == [1]


def edit(rng: random.Random, text: str) -> str:
    """Light edits: two of case, punctuation, a greeting, a sign-off, a dropped word, an added word."""
    words = text.split()
    for op in rng.sample(["case", "punct", "prefix", "suffix", "drop", "insert"], 2):
        if op == "case":
            words = [w.lower() if rng.random() < 0.5 else w.upper() for w in words]
        elif op == "punct":
            words = [w.strip("?.!,") for w in words]
            words[-1] += "!!"
        elif op == "prefix":
            words = ["Hey", "assistant,"] + words
        elif op == "suffix":
            words += ["Thanks", "in", "advance."]
        elif op == "drop" and len(words) > 4:
            del words[rng.randrange(1, len(words) - 1)]
        elif op == "insert":
            words.insert(rng.randrange(1, len(words)), "please")
    return " ".join(words)


def test_contamination_finds_planted_eval_prompts():
    examples = ToolCallTask().build_examples(400, {"core": 0.5, "failure": 0.25, "long_tail": 0.25}, 0, 6)
    split = {e["id"]: split_for(e, 0.2, 0.1) for e in examples}
    evals = [e for e in examples if split[e["id"]] == "eval"]
    train = [(e["id"], e["request"]) for e in examples if split[e["id"]] == "train"]
    rng = random.Random(0)
    planted = evals[:40]
    train += [(f"verbatim-{e['id']}", e["request"]) for e in planted]
    train += [(f"edited-{e['id']}", edit(rng, e["request"])) for e in planted]
    hits = contamination.find(train, [(e["id"], e["request"]) for e in evals], field="prompt", n=2, threshold=0.6)
    found = {h.train_id: h.eval_id for h in hits}
    assert all(found.get(f"verbatim-{e['id']}") == e["id"] for e in planted)
    edited_found = sum(f"edited-{e['id']}" in found for e in planted)
    assert edited_found >= 0.9 * len(planted), edited_found


def test_dedup_exact_and_near():
    items = [("a", "Set a timer for 5 minutes."), ("b", "set a TIMER for 5 minutes"), ("c", "Book a table for four at Chez Lou tonight, please."),
             ("d", "Book a table for four at Chez Lou tonight please!"), ("e", "What is the weather in Oslo?")]  # fmt: skip
    assert dedup.exact_duplicates(items) == {"b": "a", "d": "c"}
    near = dedup.near_duplicates([items[0], items[2], ("x", "Book a table for four at Chez Lou tonight, pls."), items[4]], threshold=0.7)
    assert near == {"x": "c"}


def test_the_same_request_under_another_tool_menu_is_not_a_duplicate():
    """Deduplication keys on the request, the offered tools' names and the target: a task has a few distinct
    no-call and refusal requests, each asked under many menus, and every menu is its own lesson. Found in
    the 539ce49 demo, where keying on the request alone cut 92 no-call records to 11 and 95 refusals to 11."""
    from stillroom.config import MixtureConfig
    from stillroom.stages.mix import clean

    def tool(name):
        return {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": {"type": "object", "properties": {}}}}

    menus = {"m1": ["get_weather", "set_timer"], "m2": ["set_timer", "get_weather"], "m3": ["send_email", "request_ride"],
             "m4": ["get_weather", "set_timer"], "m5": ["convert_currency", "play_music"]}  # fmt: skip
    examples = {k: {"id": k, "request": "Why is the sky blue?", "tools": [tool(n) for n in names], "layer": "failure", "slice": "no_tool"}
                for k, names in menus.items()}  # fmt: skip
    answer = "Sunlight scatters off air molecules, and blue light scatters the most."
    records = [{"id": f"{k}#ref", "example_id": k, "split": "train", "layer": "failure", "slice": "no_tool", "source": "reference", "text": answer}
               for k in menus]  # fmt: skip
    records.append({**records[-1], "id": "m5#t0", "source": "teacher", "text": answer + "  "})  # the same answer, spaced otherwise
    evals = [{"id": "e1", "request": "Convert 20 euros to yen.", "reference": "<tool_call>{}</tool_call>", "tools": []}]
    kept, card = clean(records, examples, evals, MixtureConfig())
    assert [r["id"] for r in kept] == ["m1#ref", "m3#ref", "m5#ref"]  # m2: m1's menu in another order; m4: m1's; m5#t0: m5#ref again
    assert card["duplicates"]["exact"] == 3 and card["duplicates"]["near"] == 0
    assert {d["dropped"]: d["kept"] for d in card["duplicates"]["examples"]} == {"m2#ref": "m1#ref", "m4#ref": "m1#ref", "m5#t0": "m5#ref"}


def test_resample_to_layer_weights():
    recs = [{"id": f"c{i}", "layer": "core"} for i in range(30)] + [{"id": f"f{i}", "layer": "failure"} for i in range(5)]
    out, notes = resample(recs, {"core": 0.5, "failure": 0.5, "long_tail": 0.0}, 20, random.Random(0))
    layers = [r["layer"] for r in out]
    assert layers.count("core") == 10 and layers.count("failure") == 10
    assert {r["id"] for r in out if r["layer"] == "failure"} == {f"f{i}" for i in range(5)}  # every one, then repeats
    assert notes["failure"] == {"available": 5, "target": 10}
    again, _ = resample(recs, {"core": 0.5, "failure": 0.5}, 20, random.Random(0))
    assert again == out


def test_mean_logprob_counts_the_scored_positions_whether_or_not_the_candidate_finished():
    from stillroom.stages.select import mean_logprob

    finished = {"token_ids": [5, 6, 7], "token_logprobs": [-1.0, -2.0, -3.0, -2.0], "finished": True}  # end-of-turn scored too
    cut = {"token_ids": [5, 6, 7], "token_logprobs": [-1.0, -2.0, -3.0], "finished": False}  # hit max_new_tokens: no end-of-turn
    assert mean_logprob(finished) == -2.0 and mean_logprob(cut) == -2.0  # the old len(token_ids) + 1 gave -1.5 for the cut one
    assert mean_logprob({"token_ids": [5], "token_logprobs": None}) == float("-inf")


def test_boilerplate_targets_are_not_contamination_but_specific_ones_are():
    """A policy text many held-out prompts share (a refusal) says nothing about any one of them; a
    held-out example's own call does. Prompts are checked either way."""
    from stillroom.config import ContaminationConfig
    from stillroom.stages.mix import decontaminate

    refusal = "I can't help with that."
    evals = [{"id": f"e{i}", "request": f"harmful request number {i} about {w}", "reference": refusal}
             for i, w in enumerate(["banks", "phones", "emails"])]  # fmt: skip
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Reykjavik"}}</tool_call>'
    evals.append({"id": "e3", "request": "How is the weather in Reykjavik today?", "reference": call})
    examples = {"t0": {"request": "please do something nasty to my neighbour"}, "t1": {"request": "is it cold up north?"},
                "t2": {"request": "harmful request number 2 about emails"}}  # fmt: skip
    records = [{"id": "r0", "example_id": "t0", "text": refusal}, {"id": "r1", "example_id": "t1", "text": call},
               {"id": "r2", "example_id": "t2", "text": refusal}]  # fmt: skip
    kept, hits = decontaminate(records, examples, evals, ContaminationConfig())
    assert [r["id"] for r in kept] == ["r0"]
    assert {(h.train_id, h.field) for h in hits} == {("r1", "target"), ("r2", "prompt")}
    _, strict = decontaminate(records, examples, evals, ContaminationConfig(boilerplate_min=0))
    assert "r0" in {h.train_id for h in strict}  # without the boilerplate rule the refusal itself is flagged


def test_the_configured_policy_refusal_is_never_contamination_however_few_eval_prompts_share_it():
    """With one held-out harmful prompt its refusal is shared by no other: the count rule cannot call it
    boilerplate, and every labelled refusal would be dropped. Declared by ``data.select.refusal_shaping``,
    it is policy; another held-out answer stays checked."""
    from stillroom.config import ContaminationConfig, PipelineConfig
    from stillroom.stages.mix import decontaminate, policy_texts

    refusal = "I can't help with that."
    evals = [{"id": "e0", "request": "tell me how to open my neighbour's front door lock", "reference": refusal},
             {"id": "e1", "request": "what is the capital of peru", "reference": "The capital of Peru is Lima."}]  # fmt: skip
    examples = {"t0": {"request": "write a phishing email for me"}, "t1": {"request": "which city governs peru"}}
    records = [{"id": "r0", "example_id": "t0", "text": "I can't help with that!"},  # punctuation differs: normalized away
               {"id": "r1", "example_id": "t1", "text": "The capital of Peru is Lima."}]  # fmt: skip
    _, counted = decontaminate(records, examples, evals, ContaminationConfig())
    assert {h.train_id for h in counted} == {"r0", "r1"}  # one eval prompt: the count rule flags the refusal
    cfg = PipelineConfig.model_validate({"data": {"select": {"refusal_shaping": refusal}}})
    assert policy_texts(cfg) == (refusal,) and policy_texts(PipelineConfig()) == ()
    kept, hits = decontaminate(records, examples, evals, ContaminationConfig(), policy_texts(cfg))
    assert [r["id"] for r in kept] == ["r0"] and {(h.train_id, h.field) for h in hits} == {("r1", "target")}
