"""Stage `generate`: the teacher samples candidates for every train and dev prompt.

Candidates go to Parquet shards of ``signals.shard_size`` prompts, each written atomically into a
scratch folder named after the stage key. A killed run resumes at the first missing shard; the
scratch folder becomes ``shards/`` in one rename when every shard is there. Candidate ``c`` of example
``x`` is drawn from its own random stream, seeded by (run seed, x, c): the same config and seed give
the same candidates whatever the batching, and a resumed run equals an uninterrupted one.

Store schema (one row per candidate; any Arrow tool opens it):

| column | type | meaning |
|---|---|---|
| example_id | string | the example |
| candidate | int32 | candidate index (0 is greedy when `include_greedy`) |
| teacher | string | teacher id |
| greedy, temperature, top_p, seed | bool, float32, float32, int64 | how it was sampled |
| text | string | completion text |
| token_ids | list<int32> | completion tokens, end-of-turn excluded |
| prompt_tokens | int32 | prompt length the teacher saw |
| finished | bool | ended at end-of-turn (else hit max_new_tokens) |
| token_logprobs | list<float32> | log p(emitted token), untempered; one per position (+ end-of-turn) |
| topk_ids | list<list<uint16>> (int32 if the vocabulary exceeds 65,536) | top-k ids per position |
| topk_logprobs | list<list<float16>> | their log-probs, untempered, descending |
| seq_logprob | float64 | sum of token_logprobs |
| messages | string (JSON) | multi-step examples: the assistant and tool turns of the episode; else null |

Every prompt runs as an episode against the task's tools (``rollout``): a single-turn example is one
turn; a multi-step example goes on while the teacher makes calls (``signals.max_tool_steps``). A
trace's ``text``, tokens and log-probs are its assistant turns joined; it has no top-k.

With ``signals.constrain: tools`` every teacher turn is decoded under a grammar (``constrained``): its
tool calls name an offered tool and carry arguments valid for that tool's schema; free text stays free.

With ``signals.score_references``, ``shards/references.parquet`` holds the teacher's teacher-forced
scores of each clean reference (same columns, ``candidate`` = -1).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from stillroom import atomic, constrained, rollout
from stillroom.plugins import registry
from stillroom.progress import add, advance, bar
from stillroom.rundir import StageContext, sha256_json
from stillroom.stages.prepare import read_examples
from stillroom.teachers import Sampling


def schema(vocab_size: int | None) -> pa.Schema:
    """The store schema; token ids are uint16 when the vocabulary is known to fit, else int32."""
    id_type = pa.uint16() if vocab_size is not None and vocab_size <= 65536 else pa.int32()
    return pa.schema(
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
        ("token_logprobs", pa.list_(pa.float32())),
        ("topk_ids", pa.list_(pa.list_(id_type))),
        ("topk_logprobs", pa.list_(pa.list_(pa.float16()))),
        ("seq_logprob", pa.float64()),
        ("messages", pa.string()),
    ]
    )


def record(example_id: str, candidate: int, teacher_id: str, g, *, greedy: bool, temperature: float, top_p: float, seed: int,
           messages: list[dict] | None = None) -> dict:  # fmt: skip
    """One store row from a ``Generated`` (and, for a multi-step episode, its turns)."""
    return {
        "example_id": example_id, "candidate": candidate, "teacher": teacher_id, "greedy": greedy,
        "temperature": temperature, "top_p": top_p, "seed": seed, "text": g.text, "token_ids": g.token_ids,
        "prompt_tokens": g.prompt_tokens, "finished": g.finished, "token_logprobs": g.token_logprobs,
        "topk_ids": g.topk_ids, "topk_logprobs": g.topk_logprobs, "seq_logprob": g.seq_logprob,
        "messages": json.dumps(messages, ensure_ascii=False) if messages else None,
    }  # fmt: skip


def sample_records(endpoint, generator_id: str, task, examples: list[dict], messages_of, *, n: int, include_greedy: bool,
                   temperature: float, top_p: float, max_new_tokens: int, seed_of, top_k: int, max_steps: int,
                   batch_size: int, constraint_of=None) -> Iterator[list[tuple[dict, rollout.Episode, dict]]]:  # fmt: skip
    """``n`` candidates per example (the first greedy when ``include_greedy``), played out as episodes
    against the task's tools, batch by batch: (example, episode, store row) for each example of a
    batch. ``seed_of(example, candidate, step)`` seeds each sampled turn; ``constraint_of(example)``
    (``constrained``) holds each turn to a format."""
    for c in range(n):
        greedy = include_greedy and c == 0
        sampling = Sampling(max_new_tokens, not greedy, temperature, top_p)
        for b in range(0, len(examples), batch_size):
            batch = examples[b : b + batch_size]
            episodes = rollout.sample(endpoint, task, batch, messages_of, sampling, lambda e, step, c=c: seed_of(e, c, step), top_k, max_steps,
                                      constraint_of)  # fmt: skip
            yield [(e, ep, record(e["id"], c, generator_id, ep.combined(), greedy=greedy, temperature=0.0 if greedy else temperature,
                                  top_p=1.0 if greedy else top_p, seed=0 if greedy else seed_of(e, c, 0),
                                  messages=ep.messages if ep.multi_turn else None))
                   for e, ep in zip(batch, episodes)]  # fmt: skip


def derive_seed(*parts) -> int:
    return int(sha256_json(list(parts))[:12], 16)


def read_candidates(generate_dir: Path, columns: list[str] | None = None, batch_size: int = 64) -> Iterator[dict]:
    """Stream candidate records in record batches (never the whole store in memory)."""
    for shard in sorted((generate_dir / "shards").glob("shard-*.parquet")):
        for batch in pq.ParquetFile(shard).iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


def read_references(generate_dir: Path, columns: list[str] | None = None) -> list[dict]:
    """The teacher-forced scores of the clean references (``signals.score_references``), or none."""
    path = generate_dir / "shards" / "references.parquet"
    return pq.read_table(path, columns=columns).to_pylist() if path.exists() else []


def open_scratch(ctx: StageContext) -> Path:
    """The stage's resumable scratch folder (named after its key); stale ones from other keys go."""
    scratch = ctx.dir / f".partial-{ctx.key[:16]}"
    for stale in ctx.dir.glob(".partial-*"):
        if stale != scratch:
            shutil.rmtree(stale)
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


def write_shard(path: Path, rows: list[dict], store_schema: pa.Schema) -> None:
    rows.sort(key=lambda r: (r["example_id"], r["candidate"]))
    with atomic.atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=store_schema), tmp)


def run(ctx: StageContext) -> None:
    cfg, s = ctx.cfg, ctx.cfg.signals
    task = registry().get("task", cfg.data.task)
    examples = list(read_examples(ctx.inputs["prepare"]).values())
    shards = [examples[i : i + s.shard_size] for i in range(0, len(examples), s.shard_size)]
    scratch = open_scratch(ctx)
    todo = [i for i in range(len(shards)) if not (scratch / f"shard-{i:05d}.parquet").exists()]
    ctx.counts["shards_resumed"] = len(shards) - len(todo)

    t0 = time.time()
    teacher = registry().get("teacher", ctx.teacher.backend)(ctx.teacher)  # the corrected teacher where `adapt` ran
    ctx.timings["load_teacher_s"] = round(time.time() - t0, 3)
    store_schema = schema(teacher.vocab_size)
    new_tokens, started = 0, time.time()
    constraint_of = (lambda e: constrained.for_example(e, s.constrain)) if s.constrain != "none" else None  # noqa: E731
    with bar() as progress:
        job = add(progress, "teacher candidates", sum(len(shards[i]) for i in todo) * s.n, "cand")
        for i in todo:
            rows = []
            seed_of = lambda e, c, step: derive_seed(cfg.run.seed, e["id"], c, *([step] if step else []))  # noqa: E731
            for batch in sample_records(teacher, teacher.id, task, shards[i], lambda e: task.teacher_messages(e, ctx.teacher.context),
                                        n=s.n, include_greedy=s.include_greedy, temperature=s.temperature, top_p=s.top_p,
                                        max_new_tokens=s.max_new_tokens, seed_of=seed_of, top_k=s.top_k, max_steps=s.max_tool_steps,
                                        batch_size=s.batch_size, constraint_of=constraint_of):  # fmt: skip
                rows += [row for _, _, row in batch]
                new_tokens += sum(len(row["token_ids"]) for _, _, row in batch)
                advance(progress, job, len(batch), info=f"{new_tokens / (time.time() - started):.1f} tok/s")
            write_shard(scratch / f"shard-{i:05d}.parquet", rows, store_schema)
    if s.score_references and not (scratch / "references.parquet").exists():
        refs = [e for e in read_examples(ctx.inputs["prepare"], reference_only=True).values() if e.get("reference")]  # the labelled pool too
        rows = []
        for b in range(0, len(refs), s.batch_size):
            batch = refs[b : b + s.batch_size]
            convs = [task.teacher_messages(e, ctx.teacher.context) for e in batch]
            for e, g in zip(batch, teacher.score(convs, [e["reference"] for e in batch], max(s.top_k, 1))):
                rows.append(record(e["id"], -1, teacher.id, g, greedy=False, temperature=1.0, top_p=1.0, seed=0))
        write_shard(scratch / "references.parquet", rows, store_schema)
        ctx.counts["references_scored"] = len(rows)
    os.replace(scratch, ctx.dir / "shards")
    ctx.timings["generate_s"] = round(time.time() - started, 3)
    if hasattr(teacher, "prefix_cache"):
        ctx.counts["prefix_cache"] = {"hits": teacher.prefix_cache.hits, "misses": teacher.prefix_cache.misses}
    if hasattr(teacher, "retries"):
        ctx.counts["http_retries"] = teacher.retries
    ctx.counts.update(prompts=len(examples), candidates=len(examples) * s.n, shards=len(shards), new_tokens=new_tokens)
    if new_tokens:
        ctx.counts["tokens_per_s"] = round(new_tokens / (time.time() - started), 2)
