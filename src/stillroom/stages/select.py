"""Stage `select`: run the configured verifiers on every candidate and pick the ones to learn from.

Policies (per example, among candidates that pass every verifier; ties go to the lower candidate index):
- ``first_passing``: the first one (candidate 0 is greedy when the sampling includes it);
- ``all_passing``: all of them;
- ``best_of_n``: the highest ``score`` (teacher sequence log-prob, or a verifier's score);
- ``majority``: self-consistency, the largest group of identical normalized outputs.

The student's own candidates (stage `self_generate`, signal ``self``) pass the same verifiers and, on
single-turn answers, the teacher's score (``signals.self.min_teacher_logprob``, mean token log-prob
under the teacher); the same policy picks among the survivors.

Preference pairs (signal ``preference``) come from each train/dev prompt's single-turn teacher
candidates, plus its clean reference as a passing candidate when ``preference.include_reference``:
``rank_by: verifiers`` pairs passing candidates (the reference first, then by teacher mean log-prob)
with failing ones (most likely under the teacher first: the hardest negatives); ``rank_by:
teacher_logprob`` pairs the highest against the lowest mean log-prob when they differ by
``min_margin``. Eval examples never reach the signal store, so pairs never use them.

Writes ``verdicts.parquet`` (every candidate's verdicts, keyed like the signal store), ``selected.jsonl``
(what the mixture reads; ``origin`` teacher or self), ``pairs.jsonl`` and ``card.json`` (per layer:
candidates, passing, kept, rejections by verifier and reason with examples; the ``reference``
verifier's rejections are listed apart; the self candidates' filter counts; pairs per layer).
"""

from __future__ import annotations

import collections
import json

import pyarrow as pa
import pyarrow.parquet as pq

from stillroom import atomic, verifiers
from stillroom.routing import logprob_stats
from stillroom.rundir import StageContext
from stillroom.stages.generate import read_candidates
from stillroom.stages.prepare import read_examples
from stillroom.textnorm import normalize

REASON_EXAMPLES = 3  # example outputs kept per rejection reason in the card
COLUMNS = ["example_id", "candidate", "text", "token_ids", "token_logprobs", "seq_logprob", "messages"]


def mean_logprob(cand: dict) -> float:
    """The teacher's mean log-prob per scored position of a candidate (the end-of-turn position counts
    when the teacher stopped there and its backend reports it; a candidate cut at max_new_tokens has
    none); -inf when unknown. The same figure as the cascade's ``mean_logprob``."""
    if not cand.get("token_logprobs"):
        return float("-inf")
    return logprob_stats(cand["token_logprobs"])["mean_logprob"]


def pairs_for(cands: list[dict], reference: dict | None, pref) -> list[tuple[dict, dict]]:
    """(chosen, rejected) from one prompt's candidates (each with ``text``, ``passed``, ``candidate``,
    and a mean log-prob under ``lp``); ``reference`` joins as a passing candidate."""
    pool = cands + ([reference] if reference is not None else [])
    if pref.rank_by == "verifiers":
        good = sorted((c for c in pool if c["passed"]), key=lambda c: (c["candidate"] != -1, -c["lp"], c["candidate"]))
        bad = sorted((c for c in pool if not c["passed"]), key=lambda c: (-c["lp"], c["candidate"]))
        pairs = list(zip(good, bad))
    else:
        ranked = sorted(pool, key=lambda c: (-c["lp"], c["candidate"]))
        pairs = [(ranked[i], ranked[-1 - i]) for i in range(len(ranked) // 2) if ranked[i]["lp"] - ranked[-1 - i]["lp"] >= max(pref.min_margin, 1e-9)]
    pairs = [(a, b) for a, b in pairs if normalize(a["text"]) != normalize(b["text"])]
    return pairs[: pref.max_pairs_per_example]


def verified(example: dict, cand: dict, checks) -> tuple[bool, dict]:
    """Every verifier's verdict on a candidate, and whether all passed."""
    verdicts = {name: check(example, cand) for name, check in checks}
    return all(v.passed for v in verdicts.values()), verdicts


def with_scores(cand: dict, verdicts: dict) -> dict:
    return {**cand, "scores": {n: v.score for n, v in verdicts.items()}}


def _candidates(path, columns):
    for cand in read_candidates(path, columns=columns):
        if cand.get("messages"):
            cand["messages"] = json.loads(cand["messages"])
        yield cand


def choose(cands: list[dict], policy: str, score: str) -> list[dict]:
    """Pick from one example's passing candidates (each with ``candidate``, ``text``, ``scores``)."""
    cands = sorted(cands, key=lambda c: c["candidate"])
    if not cands or policy == "all_passing":
        return cands
    if policy == "first_passing":
        return cands[:1]
    if policy == "best_of_n":
        key = (lambda c: c["seq_logprob"] if c["seq_logprob"] is not None else float("-inf")) if score == "seq_logprob" else (lambda c: c["scores"][score[9:]])
        return [max(cands, key=lambda c: (key(c), -c["candidate"]))]
    if policy == "majority":
        groups = collections.defaultdict(list)
        for c in cands:
            groups[normalize(c["text"])].append(c)
        best = max(groups.values(), key=lambda g: (len(g), -g[0]["candidate"]))
        return best[:1]
    raise ValueError(f"unknown policy {policy!r}")


SHAPED = -2  # candidate index of a shaped refusal: not a teacher sample, so it carries no top-k


def shape_refusals(examples: dict, selected: list[dict], text: str) -> list[dict]:
    """Refusal shaping: every prompt that must be declined and has no selected teacher answer (the
    teacher went along, and the refusal verifier rejected it) gets the policy's refusal as target."""
    have = {s["example_id"] for s in selected}
    return [{"example_id": ex_id, "candidate": SHAPED, "split": ex["split"], "layer": ex["layer"], "slice": ex["slice"], "text": text,
             "origin": "shaped"} for ex_id, ex in sorted(examples.items())
            if ex.get("expected", {}).get("kind") == "refuse" and ex_id not in have]  # fmt: skip


def run(ctx: StageContext) -> None:
    sel, signals = ctx.cfg.data.select, ctx.cfg.signals
    examples = read_examples(ctx.inputs["prepare"])
    checks = [verifiers.build(entry) for entry in sel.verifiers]
    verdict_rows, passing, by_example = [], collections.defaultdict(list), collections.defaultdict(list)
    rejected, not_applicable = collections.Counter(), collections.Counter()
    reason_examples = collections.defaultdict(list)
    for cand in _candidates(ctx.inputs["generate"], COLUMNS):
        ex = examples[cand["example_id"]]
        ok, verdicts = verified(ex, cand, checks)
        verdict_rows.append({"example_id": cand["example_id"], "candidate": cand["candidate"], "passed": ok,
                             "verdicts": json.dumps({n: [v.passed, v.reason, v.score] for n, v in verdicts.items()})})  # fmt: skip
        if ok:
            passing[cand["example_id"]].append(with_scores(cand, verdicts))
        if not cand.get("messages"):
            by_example[cand["example_id"]].append({"candidate": cand["candidate"], "text": cand["text"], "passed": ok, "lp": mean_logprob(cand)})
        for name, v in verdicts.items():
            if v.reason == "n/a":
                not_applicable[(ex["layer"], name)] += 1
            elif not v.passed:
                key = f"{name}: {v.reason.split(':')[0]}"
                rejected[(ex["layer"], key)] += 1
                if len(reason_examples[key]) < REASON_EXAMPLES:
                    reason_examples[key].append({"example_id": ex["id"], "output": cand["text"][:200], "detail": v.reason})

    def picked(pool: dict, origin: str) -> list[dict]:
        out = []
        for ex_id in sorted(pool):
            ex = examples[ex_id]
            for c in choose(pool[ex_id], sel.policy, sel.score):
                out.append({"example_id": ex_id, "candidate": c["candidate"], "split": ex["split"], "layer": ex["layer"],
                            "slice": ex["slice"], "text": c["text"], "origin": origin,
                            **({"messages": c["messages"]} if c.get("messages") else {})})  # fmt: skip
        return out

    selected = picked(passing, "teacher")
    shaped = shape_refusals(examples, selected, sel.refusal_shaping) if sel.refusal_shaping else []
    selected += shaped
    self_pool, self_counts = select_own(ctx, examples, checks, signals.self.min_teacher_logprob)
    selected += picked(self_pool, "self")
    pairs = build_pairs(ctx, examples, by_example, signals.preference)
    with atomic.atomic_path(ctx.dir / "verdicts.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(verdict_rows, schema=pa.schema([
            ("example_id", pa.string()), ("candidate", pa.int32()), ("passed", pa.bool_()), ("verdicts", pa.string()),
        ])), tmp)  # fmt: skip
    atomic.write_jsonl(ctx.dir / "selected.jsonl", selected)
    atomic.write_jsonl(ctx.dir / "pairs.jsonl", pairs)
    layer_of = {r["example_id"]: examples[r["example_id"]]["layer"] for r in verdict_rows}
    teacher_selected = [s for s in selected if s["origin"] == "teacher"]
    card = {
        "verifiers": [verifiers.parse_entry(e)[0] for e in sel.verifiers],
        "policy": sel.policy,
        "per_layer": {
            layer: {
                "examples": sum(e["layer"] == layer for e in examples.values()),
                "candidates": sum(layer_of[r["example_id"]] == layer for r in verdict_rows),
                "passing_candidates": sum(r["passed"] and layer_of[r["example_id"]] == layer for r in verdict_rows),
                "examples_with_a_selection": len({s["example_id"] for s in teacher_selected if s["layer"] == layer}),
                "selected": sum(s["layer"] == layer for s in teacher_selected),
                "rejections": {k: n for (lay, k), n in sorted(rejected.items()) if lay == layer and not k.startswith("reference:")},
                "reference_rejections": {k: n for (lay, k), n in sorted(rejected.items()) if lay == layer and k.startswith("reference:")},
                "not_applicable": {k: n for (lay, k), n in sorted(not_applicable.items()) if lay == layer},
                "pairs": sum(p["layer"] == layer for p in pairs),
            }
            for layer in sorted({e["layer"] for e in examples.values()})
        },
        "reason_examples": dict(sorted(reason_examples.items())),
        "self": {**self_counts, "selected": sum(s["origin"] == "self" for s in selected)},
        "refusals_shaped": len(shaped),
        "pairs": {"total": len(pairs), "rank_by": signals.preference.rank_by,
                  "chosen_from_reference": sum(p["chosen_from"] == "reference" for p in pairs)},  # fmt: skip
    }
    atomic.write_json(ctx.dir / "card.json", card)
    ctx.counts.update(candidates=len(verdict_rows), passing=sum(r["passed"] for r in verdict_rows), selected=len(teacher_selected),
                      self_selected=card["self"]["selected"], pairs=len(pairs), refusals_shaped=len(shaped))  # fmt: skip


def select_own(ctx: StageContext, examples: dict, checks, min_teacher_logprob: float | None) -> tuple[dict, dict]:
    """The student's own candidates that pass every verifier and, where scored, the teacher's bar."""
    pool, counts = collections.defaultdict(list), collections.Counter()
    for cand in _candidates(ctx.inputs["self_generate"], [*COLUMNS, "teacher_mean_logprob"]):
        counts["candidates"] += 1
        ok, verdicts = verified(examples[cand["example_id"]], cand, checks)
        if not ok:
            continue
        counts["passing_verifiers"] += 1
        score = cand["teacher_mean_logprob"]
        if min_teacher_logprob is not None and score is not None and score < min_teacher_logprob:
            counts["below_teacher_bar"] += 1
            continue
        counts["kept"] += 1
        pool[cand["example_id"]].append(with_scores(cand, verdicts))
    return pool, {k: counts[k] for k in ("candidates", "passing_verifiers", "below_teacher_bar", "kept")}


def build_pairs(ctx: StageContext, examples: dict, by_example: dict, pref) -> list[dict]:
    """Preference pairs per train/dev example from its single-turn candidates (and reference)."""
    from stillroom.stages.generate import read_references

    ref_lp = {r["example_id"]: mean_logprob(r) for r in read_references(ctx.inputs["generate"], ["example_id", "token_logprobs"])}
    out = []
    for ex_id in sorted(by_example):
        ex = examples[ex_id]
        ref = None
        if pref.include_reference and ex.get("reference"):
            ref = {"candidate": -1, "text": ex["reference"], "passed": True, "lp": ref_lp.get(ex_id, float("-inf"))}
        for chosen, rejected in pairs_for(by_example[ex_id], ref, pref):
            label = lambda c: "reference" if c["candidate"] == -1 else f"candidate {c['candidate']}"  # noqa: E731
            out.append({"example_id": ex_id, "split": ex["split"], "layer": ex["layer"], "slice": ex["slice"],
                        "chosen": chosen["text"], "rejected": rejected["text"], "chosen_from": label(chosen),
                        "rejected_from": label(rejected), "margin": round(chosen["lp"] - rejected["lp"], 4)
                        if chosen["lp"] > float("-inf") and rejected["lp"] > float("-inf") else None})  # fmt: skip
    return out
