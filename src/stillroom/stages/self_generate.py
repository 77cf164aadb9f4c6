"""Stage `self_generate`: the student (or a promoted version) samples its own candidates; the teacher scores them.

Only with ``signals.kind: [..., self]``; otherwise the stage writes an empty store. The generator is
``signals.self.model``: a student folder, or ``registry:ALIAS`` (the version an alias of
``signals.self.registry`` points to, e.g. ``registry:production``). It answers the train prompts only,
in the student's context-free view, ``signals.self.n`` candidates each (the first greedy), multi-step
examples played out against the task's tools. The teacher then scores every single-turn candidate
teacher-forced under its own context; ``teacher_mean_logprob`` (mean log-prob per token, end-of-turn
included) is what ``select`` filters on next to the verifiers. Traces carry no teacher score: their
verifiers check every step against the tools.

Same store schema as `generate` (``teacher`` names the generator) plus ``teacher_mean_logprob``;
shards resume like generate's.
"""

from __future__ import annotations

import os
import time

import pyarrow as pa

from stillroom import models
from stillroom import registry as versions
from stillroom.plugins import registry
from stillroom.progress import add, advance, bar
from stillroom.routing import logprob_stats
from stillroom.rundir import StageContext
from stillroom.stages.generate import derive_seed, open_scratch, sample_records, schema, write_shard
from stillroom.stages.prepare import read_split
from stillroom.teachers import HFTeacher


def external(cfg) -> dict[str, str]:
    """The generating student's weights, part of this stage's key."""
    s = cfg.signals.self
    return {} if s.model is None else {"self_model": models.weights_hash(versions.model_folder(s.model, s.registry))}


def self_schema(vocab_size: int | None) -> pa.Schema:
    return schema(vocab_size).append(pa.field("teacher_mean_logprob", pa.float64()))


def run(ctx: StageContext) -> None:
    cfg, s = ctx.cfg, ctx.cfg.signals
    scratch = open_scratch(ctx)
    if s.self.model is None:
        write_shard(scratch / "shard-00000.parquet", [], self_schema(None))
        os.replace(scratch, ctx.dir / "shards")
        ctx.counts.update(prompts=0, candidates=0)
        return
    task = registry().get("task", cfg.data.task)
    examples = read_split(ctx.inputs["prepare"], "train")
    shards = [examples[i : i + s.shard_size] for i in range(0, len(examples), s.shard_size)]
    todo = [i for i in range(len(shards)) if not (scratch / f"shard-{i:05d}.parquet").exists()]
    ctx.counts["shards_resumed"] = len(shards) - len(todo)
    folder = versions.model_folder(s.self.model, s.self.registry)
    t0 = time.time()
    student = HFTeacher.load(folder, cfg.student.dtype)
    teacher = registry().get("teacher", ctx.teacher.backend)(ctx.teacher)
    ctx.timings["load_models_s"] = round(time.time() - t0, 3)
    store_schema, generator_id = self_schema(student.vocab_size), f"self:{folder}"
    started, new_tokens = time.time(), 0
    with bar() as progress:
        job = add(progress, "student candidates", sum(len(shards[i]) for i in todo) * s.self.n, "cand")
        for i in todo:
            rows = []
            seed_of = lambda e, c, step: derive_seed(cfg.run.seed, "self", e["id"], c, step)  # noqa: E731
            for batch in sample_records(student, generator_id, task, shards[i], task.student_messages, n=s.self.n, include_greedy=True,
                                        temperature=s.self.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                                        seed_of=seed_of, top_k=1, max_steps=s.max_tool_steps, batch_size=s.batch_size):  # fmt: skip
                single = [(e, ep) for e, ep, _ in batch if not ep.multi_turn]  # traces: their verifiers check every step instead
                scores = teacher.score([task.teacher_messages(e, ctx.teacher.context) for e, _ in single],
                                       [ep.turns[0].text for _, ep in single], 1) if single else []  # fmt: skip
                by_id = {e["id"]: logprob_stats(g.token_logprobs)["mean_logprob"] for (e, _), g in zip(single, scores)}
                for e, _, row in batch:
                    rows.append({**row, "topk_ids": None, "topk_logprobs": None, "teacher_mean_logprob": by_id.get(e["id"])})
                    new_tokens += len(row["token_ids"])
                advance(progress, job, len(batch))
            write_shard(scratch / f"shard-{i:05d}.parquet", rows, store_schema)
    os.replace(scratch, ctx.dir / "shards")
    ctx.timings["generate_s"] = round(time.time() - started, 3)
    ctx.counts.update(generator=folder, prompts=len(examples), candidates=len(examples) * s.self.n, new_tokens=new_tokens)
