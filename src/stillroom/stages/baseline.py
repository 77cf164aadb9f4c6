"""Stage `baseline`: the pool-only student, what distillation has to beat.

The same student as `train` (the same init: pruned from the same, corrected where `adapt` ran, teacher;
the same recipe) trained on the labelled pool's clean references alone: no teacher
sequences, no teacher probabilities, no teacher-labelled prompts. The references go through the
mixture's own cleaning on their own (deduplicated among themselves, checked for contamination, drawn
to the layer weights; ``baseline/card.json``): taken from the distilled mixture they would have lost
every reference the teacher's identical label won a deduplication tie against (the policy refusal,
above all). Evaluated beside the distilled student on the same held-out examples, with a paired
interval for the difference. Off unless ``baseline.pool_only``.

Its length: ``baseline.steps: matched`` (the default) trains for as many optimizer steps as the distilled
student took (``train``'s manifest), cycling over the smaller pool for as many epochs as that needs, on
the same learning-rate schedule length: a gain of the distilled student is then not bought by the extra
steps its larger mixture gets at equal epochs. ``epochs``: ``train.epochs`` over the pool, fewer steps.
"""

from __future__ import annotations

from stillroom import atomic
from stillroom.plugins import registry
from stillroom.rundir import RunError, StageContext, read_manifest
from stillroom.stages.mix import clean, policy_texts, sources_of, split_and_weigh
from stillroom.stages.prepare import read_examples, read_split
from stillroom.stages.train import build_student, fit

NO_TEACHER_SIGNAL = {"sft_weight": 0.0, "kd_weight": 0.0, "trace_weight": 0.0, "self_weight": 0.0, "pref_weight": 0.0, "on_policy_weight": 0.0}


def run(ctx: StageContext) -> None:
    cfg = ctx.cfg
    if not cfg.baseline.pool_only:
        atomic.write_json(ctx.dir / "baseline.json", {"pool_only": False})
        ctx.counts["pool_only"] = False
        return
    task = registry().get("task", cfg.data.task)
    examples = read_examples(ctx.inputs["prepare"], reference_only=True)
    records, card = clean(sources_of(examples, [], [], {"reference"}, set()), examples, read_split(ctx.inputs["prepare"], "eval"),
                          cfg.data.mixture, policy_texts(cfg))  # fmt: skip
    train, dev = split_and_weigh(records, cfg, card)
    atomic.write_json(ctx.dir / "card.json", card)
    ctx.counts.update(train_records=len(train), dev_records=len(dev), contaminated=card["contamination"]["records_flagged"])
    steps = distilled_steps(ctx) if cfg.baseline.steps == "matched" else None
    if steps is not None:
        ctx.counts["steps_matched_to"] = steps
    fit(ctx, cfg.train.model_copy(update=NO_TEACHER_SIGNAL), train + dev, lambda texts: build_student(cfg, ctx.teacher, texts),
        task.student_messages, steps=steps)  # fmt: skip


def needs(cfg) -> tuple[str, ...]:
    """The stages `baseline` reads: `train` only for the step count it matches (a new distilled student
    leaves a pool-only student of fixed epochs, or none, as it was)."""
    matched = cfg is None or (cfg.baseline.pool_only and cfg.baseline.steps == "matched")
    return ("prepare", "adapt", "train") if matched else ("prepare", "adapt")


def distilled_steps(ctx: StageContext) -> int:
    """The optimizer steps the distilled student took (``train/manifest.json``)."""
    manifest = read_manifest(ctx.inputs["train"])
    steps = ((manifest or {}).get("counts") or {}).get("steps")
    if not isinstance(steps, int) or steps < 1:
        raise RunError(f"{ctx.inputs['train'] / 'manifest.json'}: no step count of the distilled student to match "
                       "(baseline.steps: matched); run `stillroom train CONFIG` first, or set baseline.steps: epochs")  # fmt: skip
    return steps

