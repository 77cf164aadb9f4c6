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
from pathlib import Path

import pyarrow as pa

from stillroom.plugins import registry
from stillroom.progress import add, advance, bar
from stillroom.rundir import StageContext
from stillroom.stages.generate import derive_seed, open_scratch, record, sample_episodes, schema, write_shard
from stillroom.stages.prepare import read_split
from stillroom.teachers import HFTeacher, Sampling


def generator_folder(model: str, registry_dir: str) -> str:
    """``signals.self.model`` as a folder: itself, or the model of the registry version an alias names."""
    if not model.startswith("registry:"):
        return model
    from stillroom import registry as versions

    return versions.resolve(Path(registry_dir), model.split(":", 1)[1])["model_path"]


def weights_hash(folder: str) -> str:
    """The hash of a model folder's weights: a registry alias that moves, or a folder retrained, changes it."""
    from stillroom.rundir import sha256_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights (a student folder written by `stillroom train`?)")
    return ",".join(sha256_file(f) for f in files)


def external(cfg) -> dict[str, str]:
    """The generating student's weights, part of this stage's key."""
    s = cfg.signals.self
    return {} if s.model is None else {"self_model": weights_hash(generator_folder(s.model, s.registry))}


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
    folder = generator_folder(s.self.model, s.self.registry)
    t0 = time.time()
    student = HFTeacher.load(folder, cfg.student.dtype)
    teacher = registry().get("teacher", cfg.teacher.backend)(cfg.teacher)
    ctx.timings["load_models_s"] = round(time.time() - t0, 3)
    store_schema, generator_id = self_schema(student.vocab_size), f"self:{folder}"
    started, new_tokens = time.time(), 0
    with bar() as progress:
        job = add(progress, "student candidates", sum(len(shards[i]) for i in todo) * s.self.n, "cand")
        for i in todo:
            rows = []
            for c in range(s.self.n):
                greedy = c == 0
                sampling = Sampling(s.max_new_tokens, not greedy, s.self.temperature, s.top_p)
                for b in range(0, len(shards[i]), s.batch_size):
                    batch = shards[i][b : b + s.batch_size]
                    seed_of = lambda e, step, c=c: derive_seed(cfg.run.seed, "self", e["id"], c, step)  # noqa: E731
                    episodes = sample_episodes(student, task, batch, task.student_messages, sampling, seed_of, 1, s.max_tool_steps)
                    single = [(e, ep) for e, ep in zip(batch, episodes) if not ep.multi_turn]
                    scores = teacher.score([task.teacher_messages(e, cfg.teacher.context) for e, _ in single],
                                           [ep.turns[0].text for _, ep in single], 1) if single else []  # fmt: skip
                    by_id = {e["id"]: g for (e, _), g in zip(single, scores)}
                    for e, ep in zip(batch, episodes):
                        g, scored = ep.combined(), by_id.get(e["id"])
                        row = record(e["id"], c, generator_id, g, greedy=greedy, temperature=0.0 if greedy else s.self.temperature,
                                     top_p=1.0 if greedy else s.top_p, seed=0 if greedy else seed_of(e, 0),
                                     messages=ep.messages if ep.multi_turn else None)  # fmt: skip
                        row.update(topk_ids=None, topk_logprobs=None,
                                   teacher_mean_logprob=scored.seq_logprob / max(len(scored.token_logprobs), 1) if scored else None)  # fmt: skip
                        rows.append(row)
                        new_tokens += len(g.token_ids)
                    advance(progress, job, len(batch))
            write_shard(scratch / f"shard-{i:05d}.parquet", rows, store_schema)
    os.replace(scratch, ctx.dir / "shards")
    ctx.timings["generate_s"] = round(time.time() - started, 3)
    ctx.counts.update(generator=folder, prompts=len(examples), candidates=len(examples) * s.self.n, new_tokens=new_tokens)
