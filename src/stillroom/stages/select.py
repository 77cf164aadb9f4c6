"""Stage `select`: run the configured verifiers on every candidate and pick the ones to learn from.

Policies (per example, among candidates that pass every verifier; ties go to the lower candidate index):
- ``first_passing``: the first one (candidate 0 is greedy when the sampling includes it);
- ``all_passing``: all of them;
- ``best_of_n``: the highest ``score`` (teacher sequence log-prob, or a verifier's score);
- ``majority``: self-consistency, the largest group of identical normalized outputs.

Writes ``verdicts.parquet`` (every candidate's verdicts, keyed like the signal store), ``selected.jsonl``
(what the mixture reads) and ``card.json`` (per layer: candidates, passing, kept, rejections by
verifier and reason with examples; the ``reference`` verifier's rejections are listed apart).
"""

from __future__ import annotations

import collections
import json

import pyarrow as pa
import pyarrow.parquet as pq

from stillroom import atomic, verifiers
from stillroom.rundir import StageContext
from stillroom.stages.generate import read_candidates
from stillroom.stages.prepare import read_examples
from stillroom.textnorm import normalize

REASON_EXAMPLES = 3  # example outputs kept per rejection reason in the card
COLUMNS = ["example_id", "candidate", "text", "token_ids", "seq_logprob"]


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


def run(ctx: StageContext) -> None:
    sel = ctx.cfg.data.select
    examples = read_examples(ctx.inputs["prepare"])
    checks = [verifiers.build(entry) for entry in sel.verifiers]
    verdict_rows, passing = [], collections.defaultdict(list)
    rejected, not_applicable = collections.Counter(), collections.Counter()
    reason_examples = collections.defaultdict(list)
    for cand in read_candidates(ctx.inputs["generate"], columns=COLUMNS):
        ex = examples[cand["example_id"]]
        verdicts = {name: check(ex, cand) for name, check in checks}
        ok = all(v.passed for v in verdicts.values())
        verdict_rows.append({"example_id": cand["example_id"], "candidate": cand["candidate"], "passed": ok,
                             "verdicts": json.dumps({n: [v.passed, v.reason, v.score] for n, v in verdicts.items()})})  # fmt: skip
        if ok:
            passing[cand["example_id"]].append({**cand, "scores": {n: v.score for n, v in verdicts.items()}})
        for name, v in verdicts.items():
            if v.reason == "n/a":
                not_applicable[(ex["layer"], name)] += 1
            elif not v.passed:
                key = f"{name}: {v.reason.split(':')[0]}"
                rejected[(ex["layer"], key)] += 1
                if len(reason_examples[key]) < REASON_EXAMPLES:
                    reason_examples[key].append({"example_id": ex["id"], "output": cand["text"][:200], "detail": v.reason})
    selected = []
    for ex_id in sorted(passing):
        ex = examples[ex_id]
        for c in choose(passing[ex_id], sel.policy, sel.score):
            selected.append({"example_id": ex_id, "candidate": c["candidate"], "split": ex["split"],
                             "layer": ex["layer"], "slice": ex["slice"], "text": c["text"]})  # fmt: skip
    with atomic.atomic_path(ctx.dir / "verdicts.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(verdict_rows, schema=pa.schema([
            ("example_id", pa.string()), ("candidate", pa.int32()), ("passed", pa.bool_()), ("verdicts", pa.string()),
        ])), tmp)  # fmt: skip
    atomic.write_jsonl(ctx.dir / "selected.jsonl", selected)
    layer_of = {r["example_id"]: examples[r["example_id"]]["layer"] for r in verdict_rows}
    card = {
        "verifiers": [verifiers.parse_entry(e)[0] for e in sel.verifiers],
        "policy": sel.policy,
        "per_layer": {
            layer: {
                "examples": sum(e["layer"] == layer for e in examples.values()),
                "candidates": sum(layer_of[r["example_id"]] == layer for r in verdict_rows),
                "passing_candidates": sum(r["passed"] and layer_of[r["example_id"]] == layer for r in verdict_rows),
                "examples_with_a_selection": len({s["example_id"] for s in selected if s["layer"] == layer}),
                "selected": sum(s["layer"] == layer for s in selected),
                "rejections": {k: n for (lay, k), n in sorted(rejected.items()) if lay == layer and not k.startswith("reference:")},
                "reference_rejections": {k: n for (lay, k), n in sorted(rejected.items()) if lay == layer and k.startswith("reference:")},
                "not_applicable": {k: n for (lay, k), n in sorted(not_applicable.items()) if lay == layer},
            }
            for layer in sorted({e["layer"] for e in examples.values()})
        },
        "reason_examples": dict(sorted(reason_examples.items())),
    }
    atomic.write_json(ctx.dir / "card.json", card)
    ctx.counts.update(candidates=len(verdict_rows), passing=sum(r["passed"] for r in verdict_rows), selected=len(selected))
