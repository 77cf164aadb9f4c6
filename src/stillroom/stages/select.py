"""Stage `select`: run the configured verifiers on every candidate and keep the good ones.

Writes ``verdicts.jsonl`` (every candidate with each verifier's verdict), ``selected.jsonl`` (what
training reads) and ``card.json`` (counts per layer before and after, rejection reasons with examples).
"""

from __future__ import annotations

import collections

from stillroom import atomic
from stillroom.plugins import registry
from stillroom.rundir import StageContext
from stillroom.stages.generate import read_candidates
from stillroom.stages.prepare import read_split

REASON_EXAMPLES = 3  # example outputs kept per rejection reason in the card


def run(ctx: StageContext) -> None:
    sel = ctx.cfg.data.select
    examples = {e["id"]: e for s in ("train", "dev") for e in read_split(ctx.inputs["prepare"], s)}
    split_of = {e["id"]: s for s in ("train", "dev") for e in read_split(ctx.inputs["prepare"], s)}
    verifiers = {name: registry().get("verifier", name) for name in sel.verifiers}
    verdict_rows, passing = [], collections.defaultdict(list)
    rejected = collections.Counter()
    reason_examples = collections.defaultdict(list)
    for cand in read_candidates(ctx.inputs["generate"]):
        ex = examples[cand["example_id"]]
        verdicts = {name: v(ex, cand["text"]) for name, v in verifiers.items()}
        ok = all(v.passed for v in verdicts.values())
        verdict_rows.append({
            "example_id": cand["example_id"], "candidate": cand["candidate"], "passed": ok,
            "verdicts": {n: {"passed": v.passed, "reason": v.reason, "score": v.score} for n, v in verdicts.items()},
        })  # fmt: skip
        if ok:
            passing[cand["example_id"]].append(cand)
        for name, v in verdicts.items():
            if not v.passed:
                key = f"{name}: {v.reason.split(':')[0]}"
                rejected[(ex["layer"], key)] += 1
                if len(reason_examples[key]) < REASON_EXAMPLES:
                    reason_examples[key].append({"example_id": ex["id"], "output": cand["text"][:200], "detail": v.reason})
    selected = []
    for ex_id in sorted(passing):
        cands = sorted(passing[ex_id], key=lambda c: c["candidate"])
        for c in cands[:1] if sel.policy == "first_passing" else cands:
            ex = examples[ex_id]
            selected.append({
                "example_id": ex_id, "candidate": c["candidate"], "split": split_of[ex_id], "layer": ex["layer"],
                "slice": ex["slice"], "text": c["text"],
            })  # fmt: skip
    atomic.write_jsonl(ctx.dir / "verdicts.jsonl", verdict_rows)
    atomic.write_jsonl(ctx.dir / "selected.jsonl", selected)
    layers = sorted({e["layer"] for e in examples.values()})
    card = {
        "verifiers": sel.verifiers,
        "policy": sel.policy,
        "per_layer": {
            layer: {
                "examples": sum(e["layer"] == layer for e in examples.values()),
                "candidates": sum(examples[r["example_id"]]["layer"] == layer for r in verdict_rows),
                "passing_candidates": sum(r["passed"] and examples[r["example_id"]]["layer"] == layer for r in verdict_rows),
                "examples_with_a_selection": len({s["example_id"] for s in selected if s["layer"] == layer}),
                "rejections": {k: n for (lay, k), n in sorted(rejected.items()) if lay == layer},
            }
            for layer in layers
        },
        "reason_examples": dict(sorted(reason_examples.items())),
    }
    atomic.write_json(ctx.dir / "card.json", card)
    ctx.counts.update(candidates=len(verdict_rows), passing=sum(r["passed"] for r in verdict_rows), selected=len(selected))
