"""Stage `prepare`: the task's examples, split into train / dev / eval by a hash of each id.

A split depends on the example id alone, so adding examples never moves an existing one; examples the
task pins (those using held-out functions) always land in eval.

``data.reference_examples`` more examples are built after the first ``n_examples``; those that the split
puts in train are written to ``train_reference.jsonl``: they train by their clean reference alone, the
teacher never sees them (no teacher time), and the dev and eval splits stay what ``n_examples`` made.
The ones that land in dev or eval, or that the task pins to eval, are dropped and counted.

With ``data.train_split_labelled: false`` the train split is an unlabelled pool: its examples are
written without their references (``reference``, ``reference_trace``), so no later stage can train on
them; only the teacher labels them. Their ``expected`` stays: the verifiers that stand for the
product's checks read it, and nothing trains on it.
"""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

from stillroom import atomic
from stillroom.plugins import registry
from stillroom.rundir import StageContext, read_manifest, sha256_file

SPLITS = ("train", "dev", "eval")


def split_for(example: dict, eval_fraction: float, dev_fraction: float, not_train: str = "eval") -> str:
    """The example's split: pinned by the task, or by the hash of its id. ``not_eval``: never held out, so
    a hash that says eval puts it in train. ``not_train``: never trained on (a function or request kept for
    measuring generalization); with ``not_train="eval"`` it is held out, with ``"eval_and_dev"`` the hash
    puts it in eval or dev in proportion to their fractions, so that dev (where thresholds and temperatures
    are fitted) holds the same kinds of examples as the held-out split."""
    pinned = example.get("pinned_split")
    if pinned in ("train", "dev", "eval"):  # the chat task pins train and dev too (whole conversations, given files)
        return pinned
    if pinned == "not_train":  # with no dev split, everything is eval
        held_out_to_eval = 1.0 if not_train == "eval" else eval_fraction / (eval_fraction + dev_fraction)
        return "eval" if bucket(example["id"]) < held_out_to_eval else "dev"
    split = split_of(example["id"], eval_fraction, dev_fraction)
    return "train" if pinned == "not_eval" and split == "eval" else split


def bucket(example_id: str) -> float:
    """Where the id's hash falls in [0, 1): fixed by the id alone, so a split never depends on the others."""
    return int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "big") / 2**64


def split_of(example_id: str, eval_fraction: float, dev_fraction: float) -> str:
    b = bucket(example_id)
    if b < eval_fraction:
        return "eval"
    return "dev" if b < eval_fraction + dev_fraction else "train"


def read_split(prepare_dir: Path, split: str) -> list[dict]:
    return atomic.read_jsonl(prepare_dir / f"{split}.jsonl")


def split_hash(prepare_dir: Path, split: str) -> str:
    """The hash this stage recorded for ``split``'s file: two runs with equal ones hold out the same examples."""
    outputs = (read_manifest(prepare_dir) or {}).get("outputs") or {}
    if f"{split}.jsonl" not in outputs:
        raise FileNotFoundError(f"{prepare_dir}: no prepare manifest recording {split}.jsonl (has the stage finished?)")
    return outputs[f"{split}.jsonl"]


REFERENCE_ONLY = "train_reference"
UNLABELLED_DROP = ("reference", "reference_trace")  # what an unlabelled pool's examples lack


def read_examples(prepare_dir: Path, splits=("train", "dev"), reference_only: bool = False) -> dict[str, dict]:
    """Examples of ``splits`` by id, in split then file order, each with its ``split``; with
    ``reference_only`` the train examples the teacher never sees follow (split ``train``)."""
    out = {e["id"]: {**e, "split": s} for s in splits for e in read_split(prepare_dir, s)}
    if reference_only and (prepare_dir / f"{REFERENCE_ONLY}.jsonl").exists():
        out.update({e["id"]: {**e, "split": "train"} for e in read_split(prepare_dir, REFERENCE_ONLY)})
    return out


def external(cfg) -> dict[str, str]:
    """The hashes of the files outside the run a task reads its examples from (``source_files``: the chat
    task's data and context files), so that prepare runs again when one changes; none for generated tasks."""
    task = registry().get("task", cfg.data.task)
    return {f"file:{f}": sha256_file(Path(f)) for f in (task.source_files(cfg) if hasattr(task, "source_files") else [])}


def run(ctx: StageContext) -> None:
    d = ctx.cfg.data
    task = registry().get("task", d.task)
    if hasattr(task, "examples_from_config"):  # a task whose examples come from files (data.task: chat)
        examples, card = task.examples_from_config(ctx.cfg)
        atomic.write_json(ctx.dir / "data_card.json", card)
        ctx.counts.update({k: v for k, v in card.items() if k != "bad_rows"})
    else:
        examples = task.build_examples(d.n_examples, d.layer_weights, ctx.cfg.run.seed, d.held_out_functions)
    ids = [e["id"] for e in examples]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"task {d.task!r} produced duplicate example ids")
    by_split = {s: [] for s in SPLITS}
    for e in examples:
        by_split[split_for(e, d.eval_fraction, d.dev_fraction, d.not_train_split)].append(e)
    if not d.train_split_labelled:
        by_split["train"] = [{k: v for k, v in e.items() if k not in UNLABELLED_DROP} for e in by_split["train"]]
    for split, rows in by_split.items():
        atomic.write_jsonl(ctx.dir / f"{split}.jsonl", rows)
        ctx.counts[split] = len(rows)
        ctx.counts[f"{split}_by_layer"] = dict(sorted(collections.Counter(e["layer"] for e in rows).items()))
    extra = []
    if d.reference_examples:
        seen = set(ids)
        grown = [e for e in task.build_examples(d.n_examples + d.reference_examples, d.layer_weights, ctx.cfg.run.seed,
                                                d.held_out_functions) if e["id"] not in seen]  # fmt: skip
        extra = [e for e in grown if split_for(e, d.eval_fraction, d.dev_fraction, d.not_train_split) == "train"
                 and (e.get("reference") or e.get("reference_trace"))]  # fmt: skip
        atomic.write_jsonl(ctx.dir / f"{REFERENCE_ONLY}.jsonl", extra)
        ctx.counts[REFERENCE_ONLY] = len(extra)
        ctx.counts[f"{REFERENCE_ONLY}_by_layer"] = dict(sorted(collections.Counter(e["layer"] for e in extra).items()))
        ctx.counts["reference_examples_dropped"] = len(grown) - len(extra)
    train_fns = {t["function"]["name"] for e in (*by_split["train"], *extra) for t in e["tools"]}  # dev is never trained on
    eval_fns = {c["name"] for e in by_split["eval"] for c in e["expected"].get("calls", [])}
    ctx.counts["eval_functions_unseen_in_training"] = len(eval_fns - train_fns)
