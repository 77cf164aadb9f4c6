"""Stage `mix`: from selected teacher sequences and clean references to the training mixture.

In order: exact deduplication, near-duplicate removal (MinHash), the contamination check against
every evaluation example (prompts against prompts, targets against references), then up/down-
sampling of the train split to ``data.layer_weights``. ``card.json`` counts records per layer and
slice after each step, with the duplicates and contamination found.
"""

from __future__ import annotations

import collections
import random

from stillroom import atomic, contamination, dedup
from stillroom.rundir import StageContext
from stillroom.stages.prepare import read_examples, read_split

EXAMPLES_IN_CARD = 5
STEPS = ("sources", "after_exact_dedup", "after_near_dedup", "after_contamination", "train_after_resample", "dev")


def counts(records: list[dict]) -> dict:
    per_layer = collections.Counter(r["layer"] for r in records)
    per_slice = collections.Counter(f"{r['layer']}/{r['slice']}" for r in records)
    return {"total": len(records), "per_layer": dict(sorted(per_layer.items())), "per_slice": dict(sorted(per_slice.items()))}


def resample(records: list[dict], weights: dict[str, float], size: int | None, rng: random.Random) -> tuple[list[dict], dict]:
    """Train records drawn to the layer weights: down-sampled without replacement, up-sampled by
    repeating (every record once, then random repeats). Layers with no records are reported."""
    by_layer = collections.defaultdict(list)
    for r in records:
        by_layer[r["layer"]].append(r)
    present = {k: w for k, w in weights.items() if w > 0 and by_layer.get(k)}
    total = size or len(records)
    out, notes = [], {"empty_layers": sorted(k for k, w in weights.items() if w > 0 and not by_layer.get(k))}
    for layer, w in sorted(present.items()):
        pool, target = by_layer[layer], round(total * w / sum(present.values()))
        if target <= len(pool):
            picked = rng.sample(pool, target)
        else:
            picked = pool + [rng.choice(pool) for _ in range(target - len(pool))]
        notes[layer] = {"available": len(pool), "target": target}
        out += [{**r, "repeat": i} for i, r in enumerate(picked)]
    out.sort(key=lambda r: (r["id"], r["repeat"]))
    return out, notes


def run(ctx: StageContext) -> None:
    cfg, m = ctx.cfg, ctx.cfg.data.mixture
    examples = read_examples(ctx.inputs["prepare"])
    evals = read_split(ctx.inputs["prepare"], "eval")
    selected = atomic.read_jsonl(ctx.inputs["select"] / "selected.jsonl")

    # 1) sources: selected teacher sequences and clean references
    sources = set(m.sources)
    records = [] if "teacher" not in sources else [{"id": f"{s['example_id']}#t{s['candidate']}", "example_id": s["example_id"], "split": s["split"],
                "layer": s["layer"], "slice": s["slice"], "source": "teacher", "candidate": s["candidate"], "text": s["text"]}
               for s in selected]  # fmt: skip
    records += [{"id": f"{e['id']}#ref", "example_id": e["id"], "split": e["split"], "layer": e["layer"],
                 "slice": e["slice"], "source": "reference", "text": e["reference"]}
                for e in examples.values() if e.get("reference") and "reference" in sources]  # fmt: skip
    records.sort(key=lambda r: (r["split"] != "train", r["id"]))  # train first: its records win ties
    card = {"steps": {"sources": counts(records)}}

    # 2) duplicates, on prompt + target
    def keyed(rs):
        return [(r["id"], examples[r["example_id"]]["request"] + "\n" + r["text"]) for r in rs]

    dups = {} if m.dedup == "none" else dedup.exact_duplicates(keyed(records))
    records = [r for r in records if r["id"] not in dups]
    card["steps"]["after_exact_dedup"] = counts(records)
    near = dedup.near_duplicates(keyed(records), m.near_threshold) if m.dedup == "near" else {}
    records = [r for r in records if r["id"] not in near]
    card["steps"]["after_near_dedup"] = counts(records)
    card["duplicates"] = {"exact": len(dups), "near": len(near),
                          "examples": [{"dropped": a, "kept": b} for a, b in list({**dups, **near}.items())[:EXAMPLES_IN_CARD]]}  # fmt: skip

    # 3) contamination against every evaluation example
    c = m.contamination
    hits = contamination.find([(r["id"], examples[r["example_id"]]["request"]) for r in records],
                              [(e["id"], e["request"]) for e in evals], field="prompt", n=c.n, threshold=c.threshold)  # fmt: skip
    hits += contamination.find([(r["id"], r["text"]) for r in records],
                               [(e["id"], e["reference"]) for e in evals if e.get("reference")],
                               field="target", n=c.n, threshold=c.threshold)  # fmt: skip
    flagged = {h.train_id for h in hits}
    card["contamination"] = {
        "action": c.action, "records_flagged": len(flagged),
        "by_field": dict(collections.Counter(h.field for h in hits)),
        "examples": [{"train": h.train_id, "eval": h.eval_id, "field": h.field, "containment": h.containment} for h in hits[:EXAMPLES_IN_CARD]],
    }  # fmt: skip
    if flagged and c.action == "fail":
        raise RuntimeError(f"{len(flagged)} training records overlap the eval split (first: {hits[0]}); "
                           "fix the sources or set data.mixture.contamination.action: drop")  # fmt: skip
    if c.action == "drop":
        records = [r for r in records if r["id"] not in flagged]
    card["steps"]["after_contamination"] = counts(records)

    # 4) the train split drawn to the layer weights; dev kept as is
    train = [r for r in records if r["split"] == "train"]
    dev = [{**r, "repeat": 0} for r in records if r["split"] == "dev"]
    if m.resample:
        train, card["resample"] = resample(train, cfg.data.layer_weights, m.size, random.Random(cfg.run.seed))
    else:
        train = [{**r, "repeat": 0} for r in train]
    card["steps"]["train_after_resample"] = counts(train)
    card["steps"]["dev"] = counts(dev)
    card["sources_in_mixture"] = dict(collections.Counter(r["source"] for r in train))
    atomic.write_jsonl(ctx.dir / "mixture.jsonl", train + dev)
    atomic.write_json(ctx.dir / "card.json", card)
    ctx.counts.update(train_records=len(train), dev_records=len(dev), duplicates=len(dups) + len(near), contaminated=len(flagged))
