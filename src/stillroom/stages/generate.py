"""Stage `generate`: the teacher samples candidates for every train and dev prompt.

Candidates go to Parquet shards of ``signals.shard_size`` prompts, each written atomically into a
scratch folder named after the stage key. A killed run resumes at the first missing shard; the
scratch folder becomes ``shards/`` in one rename when every shard is there. Candidate ``c`` of shard
``s`` is sampled with a seed derived from (run seed, s, c), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from stillroom import atomic, generation, models
from stillroom.plugins import registry
from stillroom.progress import add, advance, bar
from stillroom.rundir import StageContext, sha256_json
from stillroom.stages.prepare import read_split

SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("candidate", pa.int32()),
        ("teacher", pa.string()),
        ("greedy", pa.bool_()),
        ("temperature", pa.float32()),
        ("top_p", pa.float32()),
        ("seed", pa.int64()),
        ("text", pa.string()),
        ("token_ids", pa.list_(pa.int32())),
        ("prompt_tokens", pa.int32()),
        ("finished", pa.bool_()),
    ]
)


def derive_seed(*parts) -> int:
    return int(sha256_json(list(parts))[:12], 16)


def read_candidates(generate_dir: Path) -> Iterator[dict]:
    """Stream candidate records shard by shard (never the whole store in memory)."""
    for shard in sorted((generate_dir / "shards").glob("shard-*.parquet")):
        yield from pq.read_table(shard).to_pylist()


def run(ctx: StageContext) -> None:
    cfg, s = ctx.cfg, ctx.cfg.signals
    task = registry().get("task", cfg.data.task)
    examples = read_split(ctx.inputs["prepare"], "train") + read_split(ctx.inputs["prepare"], "dev")
    shards = [examples[i : i + s.shard_size] for i in range(0, len(examples), s.shard_size)]
    scratch = ctx.dir / f".partial-{ctx.key[:16]}"
    for stale in ctx.dir.glob(".partial-*"):
        if stale != scratch:
            shutil.rmtree(stale)
    scratch.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(len(shards)) if not (scratch / f"shard-{i:05d}.parquet").exists()]
    ctx.counts["shards_resumed"] = len(shards) - len(todo)

    t0 = time.time()
    model, tokenizer = models.load(cfg.teacher.model, cfg.teacher.dtype)
    ctx.timings["load_teacher_s"] = round(time.time() - t0, 3)
    prefix_cache = generation.PrefixCache()  # the few-shot context is computed once for the run
    teacher_id = cfg.teacher.model if cfg.teacher.model == "default" else os.path.basename(cfg.teacher.model)
    new_tokens, started = 0, time.time()
    with bar() as progress:
        job = add(progress, "teacher candidates", sum(len(shards[i]) for i in todo) * s.n, "cand")
        for i in todo:
            rows = []
            prompts = [generation.render(tokenizer, task.teacher_messages(e, cfg.teacher.context)) for e in shards[i]]
            for c in range(s.n):
                greedy = s.include_greedy and c == 0
                seed = derive_seed(cfg.run.seed, i, c)
                for b in range(0, len(prompts), s.batch_size):
                    outs = generation.generate(
                        model, tokenizer, prompts[b : b + s.batch_size], max_new_tokens=s.max_new_tokens,
                        sample=not greedy, temperature=s.temperature, top_p=s.top_p, seed=derive_seed(seed, b),
                        prefix_cache=prefix_cache,
                    )  # fmt: skip
                    for e, g in zip(shards[i][b : b + s.batch_size], outs):
                        rows.append({
                            "example_id": e["id"], "candidate": c, "teacher": teacher_id, "greedy": greedy,
                            "temperature": 0.0 if greedy else s.temperature, "top_p": 1.0 if greedy else s.top_p,
                            "seed": seed, "text": g.text, "token_ids": g.token_ids,
                            "prompt_tokens": g.prompt_tokens, "finished": g.finished,
                        })  # fmt: skip
                        new_tokens += len(g.token_ids)
                    advance(progress, job, len(outs), info=f"{new_tokens / (time.time() - started):.1f} tok/s")
            rows.sort(key=lambda r: (r["example_id"], r["candidate"]))
            with atomic.atomic_path(scratch / f"shard-{i:05d}.parquet") as tmp:
                pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    os.replace(scratch, ctx.dir / "shards")
    ctx.timings["generate_s"] = round(time.time() - started, 3)
    ctx.counts["prefix_cache"] = {"hits": prefix_cache.hits, "misses": prefix_cache.misses}
    ctx.counts.update(prompts=len(examples), candidates=len(examples) * s.n, shards=len(shards), new_tokens=new_tokens)
    if new_tokens:
        ctx.counts["tokens_per_s"] = round(new_tokens / (time.time() - started), 2)
