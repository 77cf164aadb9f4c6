"""Stage `adapt`: teacher correction, before the teacher generates anything.

A small teacher is often not competent at the product's task out of the box (the default 135M teacher
gets 1 in 16 tool calls right with a few-shot context). The field's answer (Minitron's "teacher
correction"; the task-fine-tuned teachers of DistilBERT, TinyBERT, MiniLLM) is to fine-tune the
teacher on the labelled data first. This stage fine-tunes it (full weights, the top
``adapt.train_layers`` only, or LoRA merged back) on the clean references of the labelled pool
(``data.reference_examples``; the train split too unless it is an unlabelled pool), behind the prompt
it will answer with (``teacher.context``), with the same loop as `train`. Its records pass the same
contamination check against the held-out split as the student's mixture. The corrected teacher
(``adapt/model``) is then the one that generates, scores, is pruned into the student, is evaluated
and answers cascade escalations; its weights' hash reaches every later stage's key through this
stage's outputs. Off unless ``adapt.enabled``.
"""

from __future__ import annotations

from stillroom import atomic, models
from stillroom.config import TrainConfig
from stillroom.plugins import registry
from stillroom.rundir import StageContext
from stillroom.stages.mix import decontaminate, sources_of
from stillroom.stages.prepare import read_examples, read_split
from stillroom.stages.train import fit


def run(ctx: StageContext) -> None:
    cfg, a = ctx.cfg, ctx.cfg.adapt
    if not a.enabled:
        atomic.write_json(ctx.dir / "adapt.json", {"enabled": False})
        ctx.counts["enabled"] = False
        return
    task = registry().get("task", cfg.data.task)
    examples = read_examples(ctx.inputs["prepare"], reference_only=True)
    records = sources_of(examples, [], [], {"reference"}, set())  # the labelled pool's references (and dev's, for the dev loss)
    records, hits = decontaminate(records, examples, read_split(ctx.inputs["prepare"], "eval"), cfg.data.mixture.contamination)
    records = [{**r, "repeat": 0} for r in records]
    t = TrainConfig(epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size, lr=a.lr, warmup_fraction=a.warmup_fraction,
                    min_lr_ratio=a.min_lr_ratio, max_length=a.max_length, sft_weight=0.0, reference_weight=1.0,
                    train_layers=a.train_layers, lora=a.lora, precision=a.precision)  # fmt: skip
    ctx.counts["contaminated_dropped"] = len({h.train_id for h in hits})
    fit(ctx, t, records, lambda texts: (*models.load(cfg.teacher.model, "float32"), {"corrected_from": cfg.teacher.model}),
        lambda e: task.teacher_messages(e, cfg.teacher.context))
