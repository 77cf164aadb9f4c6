"""Stage `mix`: from the selected signals and clean references to the training mixture.

Sources (``source`` of a record), by ``signals.kind`` and ``data.mixture.sources``:
- ``teacher``: selected single-turn teacher sequences (kinds sequence, logit);
- ``trace``: selected multi-step teacher traces, with their ``messages`` (kind tool_trace);
- ``pair``: preference pairs, ``chosen`` and ``rejected`` (kind preference);
- ``self``: the student's own selected outputs (kind self), capped at ``signals.self.max_share`` of
  the training records;
- ``reference``: clean reference answers, and reference traces of multi-step examples.

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
from stillroom.textnorm import normalize

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


def trace_text(messages: list[dict]) -> str:
    """A trace as one text (assistant and tool turns), for deduplication and the contamination check."""
    return "\n".join(m["content"] for m in messages)


def sources_of(examples: dict, selected: list[dict], pairs: list[dict], sources: set[str], kinds: set[str]) -> list[dict]:
    """Mixture records from the selected candidates, the pairs and the references; train first."""
    base = lambda x: {"example_id": x["example_id"], "split": x["split"], "layer": x["layer"], "slice": x["slice"]}  # noqa: E731
    records = []
    for s in selected:
        trace = bool(s.get("messages"))
        source = "self" if s["origin"] == "self" else "trace" if trace else "teacher"
        wanted = {"self": "self" in kinds, "trace": "tool_trace" in kinds,
                  "teacher": "teacher" in sources and bool(kinds & {"sequence", "logit"})}[source]  # fmt: skip
        if wanted:
            tag = {"self": "s", "trace": "tr", "teacher": "t"}[source] + ("shaped" if s["origin"] == "shaped" else "")
            records.append({"id": f"{s['example_id']}#{tag}{s['candidate']}", **base(s), "source": source, "candidate": s["candidate"],
                            "text": trace_text(s["messages"]) if trace else s["text"], **({"messages": s["messages"]} if trace else {})})  # fmt: skip
    if "preference" in kinds:
        records += [{"id": f"{p['example_id']}#p{k}", **base(p), "source": "pair", "text": p["chosen"], "chosen": p["chosen"],
                     "rejected": p["rejected"]} for k, p in enumerate(pairs)]  # fmt: skip
    if "reference" in sources:
        for e in examples.values():
            ref = {"example_id": e["id"], **{k: e[k] for k in ("split", "layer", "slice")}}
            if e.get("reference"):
                records.append({"id": f"{e['id']}#ref", **base(ref), "source": "reference", "text": e["reference"]})
            elif e.get("reference_trace"):
                records.append({"id": f"{e['id']}#ref", **base(ref), "source": "reference", "text": trace_text(e["reference_trace"]),
                                "messages": e["reference_trace"]})  # fmt: skip
    records.sort(key=lambda r: (r["split"] != "train", r["id"]))  # train first: its records win ties
    return records


def decontaminate(records: list[dict], examples: dict, evals: list[dict], c, policy: tuple[str, ...] = ()) -> tuple[list[dict], list]:
    """Records that overlap an evaluation example (prompts against prompts, targets against
    references): the records to keep under ``c.action`` and every hit. ``fail`` raises.

    A reference is left out of the target check when it is boilerplate: ``c.boilerplate_min`` or more
    distinct eval prompts share it, or it is one of the run's own ``policy`` texts (the refusal of
    ``data.select.refusal_shaping``), which the config declares and which reveals no eval example
    however few held-out prompts happen to share it."""
    hits = contamination.find([(r["id"], examples[r["example_id"]]["request"]) for r in records],
                              [(e["id"], e["request"]) for e in evals], field="prompt", n=c.n, threshold=c.threshold)  # fmt: skip
    targets = [(e["id"], e["request"], e.get("reference") or trace_text(e["reference_trace"])) for e in evals
               if e.get("reference") or e.get("reference_trace")]  # fmt: skip
    prompts_of = collections.defaultdict(set)
    for _, request, text in targets:
        prompts_of[normalize(text)].add(normalize(request))
    declared = {normalize(p) for p in policy}
    specific = [(i, text) for i, _, text in targets if normalize(text) not in declared
                and (not c.boilerplate_min or len(prompts_of[normalize(text)]) < c.boilerplate_min)]  # fmt: skip
    hits += contamination.find([(r["id"], r["text"]) for r in records], specific, field="target", n=c.n, threshold=c.threshold)
    flagged = {h.train_id for h in hits}
    if flagged and c.action == "fail":
        raise RuntimeError(f"{len(flagged)} training records overlap the eval split (first: {hits[0]}); "
                           "fix the sources or set data.mixture.contamination.action: drop")  # fmt: skip
    return ([r for r in records if r["id"] not in flagged] if c.action == "drop" else records), hits


def cap_self(records: list[dict], max_share: float, rng: random.Random) -> tuple[list[dict], dict]:
    """At most ``max_share`` of the training records may be the student's own (drawn without replacement)."""
    own = [r for r in records if r["source"] == "self" and r["split"] == "train"]
    others = sum(r["split"] == "train" for r in records) - len(own)
    limit = len(own) if max_share >= 1 else int(max_share * others / (1 - max_share))
    if len(own) <= limit:
        return records, {"self_records": len(own), "dropped": 0, "max_share": max_share}
    keep = {r["id"] for r in rng.sample(own, limit)}
    out = [r for r in records if not (r["source"] == "self" and r["split"] == "train") or r["id"] in keep]
    return out, {"self_records": limit, "dropped": len(own) - limit, "max_share": max_share}


def input_text(example: dict) -> str:
    """An example's input as deduplication sees it: its request and the names of the tools it offers.
    The same request under another tool menu is another lesson (answer it without any of these tools,
    or pick this one among them), not a duplicate: keyed on the request alone, a task's few distinct
    no-call and refusal requests collapsed to one record each. Names, not schemas: shared schema text
    would make examples with one menu near duplicates whatever their requests."""
    names = sorted(t["function"]["name"] for t in example.get("tools") or [])
    return example["request"] + (f"\n(tools: {', '.join(names)})" if names else "")


def policy_texts(cfg) -> tuple[str, ...]:
    """The answers the config itself prescribes (the refusal of ``data.select.refusal_shaping``): in the
    eval split's references they are policy, not an example's answer, so never contamination."""
    return (cfg.data.select.refusal_shaping,) if cfg.data.select.refusal_shaping else ()


def clean(records: list[dict], examples: dict, evals: list[dict], m, policy: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    """Exact and near duplicates out (on input + target: ``input_text``), then the contamination check against every
    evaluation example: the records kept and a card (counts after each step, duplicates, hits). The
    pool-only baseline runs its own records through this too, so its references are deduplicated
    among themselves, not against the teacher's labels. ``policy``: the run's declared policy texts
    (``policy_texts``), never contamination."""

    def keyed(rs):  # a pair is its prompt with both sides: it never duplicates the reference it prefers
        return [(r["id"], input_text(examples[r["example_id"]]) + "\n" + r["text"] + ("\n<rejected>\n" + r["rejected"] if r["source"] == "pair" else ""))
                for r in rs]  # fmt: skip

    card: dict = {"steps": {"sources": counts(records)}}
    dups = {} if m.dedup == "none" else dedup.exact_duplicates(keyed(records))
    records = [r for r in records if r["id"] not in dups]
    card["steps"]["after_exact_dedup"] = counts(records)
    near = dedup.near_duplicates(keyed(records), m.near_threshold) if m.dedup == "near" else {}
    records = [r for r in records if r["id"] not in near]
    card["steps"]["after_near_dedup"] = counts(records)
    card["duplicates"] = {"exact": len(dups), "near": len(near),
                          "examples": [{"dropped": a, "kept": b} for a, b in list({**dups, **near}.items())[:EXAMPLES_IN_CARD]]}  # fmt: skip
    c = m.contamination
    kept, hits = decontaminate(records, examples, evals, c, policy)
    flagged = {h.train_id for h in hits}
    card["contamination"] = {
        "action": c.action, "records_flagged": len(flagged), "policy_texts": list(policy),
        "by_field": dict(collections.Counter(h.field for h in hits)),
        "examples": [{"train": h.train_id, "eval": h.eval_id, "field": h.field, "containment": h.containment} for h in hits[:EXAMPLES_IN_CARD]],
    }  # fmt: skip
    card["steps"]["after_contamination"] = counts(kept)
    return kept, card


def split_and_weigh(records: list[dict], cfg, card: dict) -> tuple[list[dict], list[dict]]:
    """The train split drawn to ``data.layer_weights`` (when ``data.mixture.resample``), dev kept as is."""
    train = [r for r in records if r["split"] == "train"]
    dev = [{**r, "repeat": 0} for r in records if r["split"] == "dev"]
    if cfg.data.mixture.resample:
        train, card["resample"] = resample(train, cfg.data.layer_weights, cfg.data.mixture.size, random.Random(cfg.run.seed))
    else:
        train = [{**r, "repeat": 0} for r in train]
    card["steps"]["train_after_resample"] = counts(train)
    card["steps"]["dev"] = counts(dev)
    card["sources_in_mixture"] = dict(collections.Counter(r["source"] for r in train))
    return train, dev


def run(ctx: StageContext) -> None:
    cfg, m = ctx.cfg, ctx.cfg.data.mixture
    examples = read_examples(ctx.inputs["prepare"], reference_only=True)
    evals = read_split(ctx.inputs["prepare"], "eval")
    selected = atomic.read_jsonl(ctx.inputs["select"] / "selected.jsonl")

    # 1) sources: selected signals and clean references; 2) duplicates; 3) contamination
    records = sources_of(examples, selected, atomic.read_jsonl(ctx.inputs["select"] / "pairs.jsonl"), set(m.sources), set(cfg.signals.kind))
    records, card = clean(records, examples, evals, m, policy_texts(cfg))

    # 4) the cap on self-made records, then the train split drawn to the layer weights; dev kept as is
    records, card["self_cap"] = cap_self(records, cfg.signals.self.max_share, random.Random(f"{cfg.run.seed}/self"))
    train, dev = split_and_weigh(records, cfg, card)
    atomic.write_jsonl(ctx.dir / "mixture.jsonl", train + dev)
    atomic.write_json(ctx.dir / "card.json", card)
    ctx.counts.update(train_records=len(train), dev_records=len(dev), duplicates=card["duplicates"]["exact"] + card["duplicates"]["near"],
                      contaminated=card["contamination"]["records_flagged"])  # fmt: skip
