"""Stage `eval`: teacher (with its context) and student (without) on the same held-out examples.

Quality: task success (the example's reference checker) and format validity (the tool-call
verifier), overall and per layer. Speed: end-to-end latency of single requests (render, tokenize,
generate, decode, parse), so the teacher's long few-shot prompt shows in its figures.
"""

from __future__ import annotations

import collections
import statistics
import time

from stillroom import atomic, generation, models, toolcalls
from stillroom.plugins import registry
from stillroom.progress import add, advance, bar
from stillroom.rundir import StageContext
from stillroom.stages.prepare import read_split
from stillroom.teachers import HFTeacher, Sampling


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def evaluate_model(label, endpoint, messages_of, examples, ecfg, task, price_per_hour) -> tuple[dict, list[dict]]:
    """``endpoint``: a Teacher (``complete``); timing goes through ``timed_request`` for local models
    (cold: the whole prompt processed) and through ``complete`` for remote ones (HTTP included)."""
    formats = [registry().get("verifier", name)() for name in ("tool_call", "no_call")]
    local = getattr(endpoint, "model", None)  # a local model: timed cold, and its size is known
    greedy = Sampling(ecfg.max_new_tokens)
    outputs, new_tokens = [], 0
    with bar() as progress:
        job = add(progress, f"eval {label}", len(examples), "ex")
        t0 = time.time()
        for i in range(0, len(examples), ecfg.batch_size):
            batch = examples[i : i + ecfg.batch_size]
            convs = [messages_of(e) for e in batch]
            for e, g in zip(batch, endpoint.complete(convs, greedy, [0] * len(batch), 0)):
                ok = task.check(e, g.text)
                valid = all(f(e, {"text": g.text, "token_ids": g.token_ids}).passed for f in formats)
                outputs.append({"model": label, "example_id": e["id"], "layer": e["layer"], "slice": e["slice"],
                                "output": g.text, "success": ok.passed, "reason": ok.reason, "format_valid": valid,
                                "prompt_tokens": g.prompt_tokens})  # fmt: skip
                new_tokens += len(g.token_ids)
            advance(progress, job, len(batch))
        batch_s = time.time() - t0
    latencies = []
    with bar() as progress:
        job = add(progress, f"latency {label}", min(ecfg.latency_requests, len(examples)), "req")
        for e in examples[: ecfg.latency_requests]:
            if local is not None:  # cold request: no prefix cache, the whole prompt processed
                seconds, _ = generation.timed_request(local, endpoint.tokenizer, messages_of(e), ecfg.max_new_tokens, toolcalls.parse)
            else:
                t1 = time.perf_counter()
                toolcalls.parse(endpoint.complete([messages_of(e)], greedy, [0], 0)[0].text)
                seconds = time.perf_counter() - t1
            latencies.append(seconds)
            advance(progress, job)

    def share(rows, key):
        return round(sum(r[key] for r in rows) / len(rows), 4) if rows else None

    by_layer = collections.defaultdict(list)
    for r in outputs:
        by_layer[r["layer"]].append(r)
    p50 = percentile(latencies, 50)
    metrics = {
        "examples": len(outputs),
        "task_success": share(outputs, "success"),
        "format_validity": share(outputs, "format_valid"),
        "per_layer": {k: {"n": len(v), "task_success": share(v, "success"), "format_validity": share(v, "format_valid")}
                      for k, v in sorted(by_layer.items())},  # fmt: skip
        "mean_prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in outputs), 1),
        "latency_p50_ms": round(1000 * p50, 1),
        "latency_p95_ms": round(1000 * percentile(latencies, 95), 1),
        "latency_requests": len(latencies),
        "batch_tokens_per_s": round(new_tokens / batch_s, 2),
        "cost_per_1k_requests": round(p50 * 1000 / 3600 * price_per_hour, 5),
        "params": models.n_params(local) if local is not None else None,
        "weight_mb": round(models.weight_bytes(local) / 2**20, 1) if local is not None else None,
        "failure_reasons": dict(collections.Counter(r["reason"] for r in outputs if not r["success"]).most_common()),
    }
    return metrics, outputs


def run(ctx: StageContext) -> None:
    cfg, ecfg = ctx.cfg, ctx.cfg.eval
    task = registry().get("task", cfg.data.task)
    examples = read_split(ctx.inputs["prepare"], ecfg.split)[: ecfg.max_examples]
    price = cfg.targets.hardware_price_per_hour
    results, all_outputs = {}, []
    candidates = [
        ("teacher", lambda: registry().get("teacher", cfg.teacher.backend)(cfg.teacher), lambda e: task.teacher_messages(e, cfg.teacher.context)),
        ("student", lambda: HFTeacher.load(str(ctx.inputs["train"] / "model"), cfg.student.dtype), task.student_messages),
    ]  # fmt: skip
    for label, load, messages_of in candidates:
        endpoint = load()
        results[label], outputs = evaluate_model(label, endpoint, messages_of, examples, ecfg, task, price)
        all_outputs += outputs
        del endpoint
    atomic.write_json(ctx.dir / "results.json", {"split": ecfg.split, "models": results})
    atomic.write_jsonl(ctx.dir / "outputs.jsonl", all_outputs)
    ctx.counts.update(examples=len(examples), **{f"{k}_task_success": v["task_success"] for k, v in results.items()})
