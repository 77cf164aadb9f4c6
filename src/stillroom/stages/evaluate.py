"""Stage `eval`: teacher (with its context) and student (without) on the same held-out examples.

1) Quality pass per model, through the same generation path as serving: every registered metric in
   ``eval.metrics`` per example (task success, format validity, unsafe compliance, over-refusal), and
   the model's confidence in its answer (mean token probability, or sequence probability).
2) Summaries: each metric overall, per layer and per slice tag with bootstrap 95% intervals and counts;
   calibration (ECE with fixed bins, Brier, the reliability table; optionally a temperature fitted on
   the dev split); paired student - teacher deltas per group, flagged when the interval excludes 0.
3) Speed and cost end to end: single requests from text to parsed answer (render, tokenize, prefill of
   the whole prompt, the teacher's few-shot context included, generation, decode, parse): p50 / p95,
   batch tokens/s, peak resident memory growth, cost per 1,000 requests at the configured price.
   With ``eval.constrain: tools`` the student is measured a second time with its tool calls held to the
   offered tools' schemas (``student_constrained``), with the paired change and the speed ratio.
4) Gates: ``eval.gates`` and the ``targets`` ceilings give ``verdict.json``; ``stillroom eval`` exits
   non-zero when one fails.

``eval.engine: llamacpp`` measures every local model on llama.cpp instead of torch (``engines.py``): each
is exported to a GGUF file in a scratch folder (f16; the quantized student in ``eval.gguf_quantize`` with
its SmoothQuant scales folded, labelled e.g. ``student_q8_0``), so teacher and students compare on one engine.
"""

from __future__ import annotations

import collections
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from stillroom import atomic, calibration, constrained, gates, generation, metrics, models, rollout, routing, toolcalls
from stillroom import registry as versions
from stillroom.memory import PeakMemory
from stillroom.metrics import percentile
from stillroom.plugins import registry
from stillroom.progress import add, advance, bar
from stillroom.rundir import StageContext
from stillroom.stages.compress import read_recipe
from stillroom.stages.prepare import read_split
from stillroom.tasks import answer_of
from stillroom.teachers import HFTeacher, Sampling


def quality_pass(label, endpoint, messages_of, examples, batch_size, max_new_tokens, measures, max_steps,
                 constraint_of=None) -> tuple[list[dict], int, float]:  # fmt: skip
    """Greedy answers with their token log-probs, multi-step examples played out against the task's
    tools; per example the metric values and the confidence (over every assistant turn).
    ``constraint_of(example)``: the format each turn is held to (``constrained``), or no constraint."""
    greedy = Sampling(max_new_tokens)
    rows, new_tokens = [], 0
    with bar() as progress:
        job = add(progress, f"eval {label}", len(examples), "ex")
        t0 = time.time()
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            task = registry().get("task", batch[0]["task"])
            episodes = rollout.sample(endpoint, task, batch, messages_of, greedy, lambda e, step: 0, 1, max_steps, constraint_of)
            for e, ep in zip(batch, episodes):
                g = ep.combined()
                trace = {"messages": ep.messages} if ep.multi_turn else {}
                out = {"text": g.text, "token_ids": g.token_ids, **trace}
                verdict = task.check(e, answer_of(out))
                rows.append({"model": label, "example_id": e["id"], "layer": e["layer"], "slice": e["slice"], "tags": e.get("tags", []),
                             "output": g.text, "reason": verdict.reason, "prompt_tokens": g.prompt_tokens,
                             "new_tokens": len(g.token_ids), "turns": len(ep.turns), **routing.logprob_stats(g.token_logprobs),
                             "metrics": {name: m(e, out) for name, m in measures.items()}, **trace})  # fmt: skip
                new_tokens += len(g.token_ids)
            advance(progress, job, len(batch))
    return rows, new_tokens, time.time() - t0


def local_model(endpoint):
    """The model of a local endpoint; None for a remote one (whose ``model`` is the served model's name)."""
    return endpoint.model if isinstance(endpoint, HFTeacher) else None


class Loader:
    """Endpoints of local model folders on the configured engine. torch: ``HFTeacher``; llamacpp: the
    folder exported to GGUF under ``scratch`` and served by ``LlamaCppEngine`` (``id``, ``vocab_size``
    and ``weight_mb``, the file's size, set here)."""

    def __init__(self, engine: str, scratch: Path, dtype: str):
        self.engine, self.scratch, self.dtype = engine, scratch, dtype

    def __call__(self, label: str, folder: str, quantize: str = "none", smoothing=None, gguf_format: str = "f16"):
        if self.engine == "torch":
            return HFTeacher.load(folder, self.dtype if quantize == "none" else "float32", quantize, smoothing)
        from stillroom import export
        from stillroom.engines import LlamaCppEngine

        path = export.export_model(models.resolve(folder), self.scratch / label, [gguf_format], smoothing, label)[gguf_format]
        from transformers import AutoTokenizer

        endpoint = LlamaCppEngine(path, AutoTokenizer.from_pretrained(models.resolve(folder)))
        endpoint.id, endpoint.vocab_size, endpoint.weight_mb = label, len(endpoint.tokenizer), round(path.stat().st_size / 2**20, 1)
        return endpoint


def latency_pass(label, endpoint, messages_of, examples, n, max_new_tokens, constraint_of=None) -> list[float]:
    local = local_model(endpoint)
    latencies = []
    with bar() as progress:
        job = add(progress, f"latency {label}", min(n, len(examples)), "req")
        for e in examples[:n]:
            if local is not None:  # cold request: no prefix cache, the whole prompt processed
                seconds, _ = generation.timed_request(local, endpoint.tokenizer, messages_of(e), max_new_tokens, toolcalls.parse,
                                                      constraint_of(e) if constraint_of else None)  # fmt: skip
            else:  # remote (HTTP included) or llama.cpp in process
                if hasattr(endpoint, "forget"):  # llama.cpp: a cold request too, no prefix reused
                    endpoint.forget()
                t1 = time.perf_counter()
                held = {"constraints": [constraint_of(e)]} if constraint_of else {}
                toolcalls.parse(endpoint.complete([messages_of(e)], Sampling(max_new_tokens), [0], 0, **held)[0].text)
                seconds = time.perf_counter() - t1
            latencies.append(seconds)
            advance(progress, job)
    return latencies


def summarize(rows, latencies, new_tokens, batch_s, ecfg, names, price, seed, size, peak_mb) -> dict:
    """``size``: (parameters, weight MB) of a local model, None for a remote one."""
    correct = [r["metrics"]["task_success"] for r in rows]
    conf = [routing.confidence(r, ecfg.confidence) for r in rows]
    p50 = percentile(latencies, 50)
    return {
        "examples": len(rows),
        "metrics": metrics.by_group(rows, names, None, seed)["all"],
        "per_layer": metrics.by_group(rows, names, "layer", seed),
        "per_slice": metrics.by_group(rows, names, "slice", seed),
        "per_tag": metrics.by_tag(rows, names, seed),
        "ece": round(calibration.ece(conf, correct, ecfg.calibration_bins), 4),
        "brier": round(calibration.brier(conf, correct), 4),
        "reliability": calibration.reliability(conf, correct, ecfg.calibration_bins),
        "confidence": ecfg.confidence,
        "mean_prompt_tokens": round(statistics.fmean(r["prompt_tokens"] for r in rows), 1),
        "latency_p50_ms": round(1000 * p50, 1),
        "latency_p95_ms": round(1000 * percentile(latencies, 95), 1),
        "latency_requests": len(latencies),
        "tokens_per_s": round(new_tokens / batch_s, 2),
        "requests_per_s": round(len(rows) / batch_s, 4),  # a multi-step example is one request: what a deployment serves
        "batch_seconds": round(batch_s, 4),  # the batched pass over the examples (eval.batch_size), both rates' denominator
        "peak_memory_mb": peak_mb,
        "cost_per_1k_requests": round(p50 * 1000 / 3600 * price, 5),
        "params": size[0] if size else None,
        "weight_mb": size[1] if size else None,
        "failure_reasons": dict(collections.Counter(r["reason"] for r in rows if r["reason"] != "ok").most_common()),
    }


def run(ctx: StageContext) -> None:
    cfg, ecfg = ctx.cfg, ctx.cfg.eval
    task = registry().get("task", cfg.data.task)
    examples = read_split(ctx.inputs["prepare"], ecfg.split)[: ecfg.max_examples]
    measures = {name: metrics.build(name) for name in ecfg.metrics}
    price, seed = cfg.targets.hardware_price_per_hour, cfg.run.seed
    recipe, smoothing = read_recipe(ctx.inputs["compress"])
    quantize = recipe["method"]
    student_dir = str(ctx.inputs["train"] / "model")
    teacher = ctx.teacher  # the corrected teacher where `adapt` ran
    scratch = tempfile.TemporaryDirectory(prefix="stillroom-gguf-")  # llamacpp: the GGUF files, gone after the stage
    load_local = Loader(ecfg.engine, Path(scratch.name), ecfg.dtype or cfg.student.dtype)

    def load_teacher(label, t):
        if t.backend != "hf":
            return registry().get("teacher", t.backend)(t)
        if ecfg.engine != "torch":
            return load_local(label, t.model)
        return registry().get("teacher", "hf")(t.model_copy(update={"dtype": ecfg.dtype or t.dtype}))

    candidates = [
        ("teacher", lambda: load_teacher("teacher", teacher), lambda e: task.teacher_messages(e, teacher.context)),
        ("student", lambda: load_local("student", student_dir), task.student_messages),
    ]  # fmt: skip
    if cfg.adapt.enabled and ecfg.shipped_teacher:  # the teacher as shipped, before correction
        candidates.insert(0, ("teacher_shipped", lambda: load_teacher("teacher_shipped", cfg.teacher),
                              lambda e: task.teacher_messages(e, ecfg.shipped_teacher_context)))  # fmt: skip
    pool_only_dir = ctx.inputs["baseline"] / "model"
    if pool_only_dir.exists():  # the pool-only student (stage `baseline`)
        candidates.append(("pool_only", lambda: load_local("pool_only", str(pool_only_dir)), task.student_messages))
    if ecfg.previous is not None:  # an earlier student on the same examples (self-distillation's guard)
        previous_dir = versions.model_folder(ecfg.previous, ecfg.registry)
        candidates.append(("previous", lambda: load_local("previous", previous_dir), task.student_messages))
    constraint_of = {}  # label -> the format its turns are held to
    if ecfg.constrain != "none":  # the same student under the grammar, beside the free one
        candidates.append(("student_constrained", lambda: load_local("student_constrained", student_dir), task.student_messages))
        constraint_of["student_constrained"] = lambda e: constrained.for_example(e, ecfg.constrain)
    if ecfg.engine == "llamacpp":  # the quantized student in the GGUF format asked for, smoothing folded
        q_label = f"student_{ecfg.gguf_quantize}"
        candidates.append((q_label, lambda: load_local(q_label, student_dir, smoothing=smoothing, gguf_format=ecfg.gguf_quantize),
                           task.student_messages))  # fmt: skip
    elif quantize != "none":
        candidates.append((f"student_{quantize.split('_')[0]}", lambda: load_local("student_int8", student_dir, quantize, smoothing),
                           task.student_messages))  # fmt: skip
    results, rows_of, dev_rows_of, measured = {}, {}, {}, {}
    extra_of = {}  # label -> what a model's results add beside summarize's figures
    routed = next((c[0] for c in candidates if c[0].startswith("student_") and c[0] not in constraint_of), "student")  # the served student: quantized when it is
    auto_confidence = ecfg.confidence == "auto"
    need_dev = ({"student"} if ecfg.fit_temperature or auto_confidence else set()) | ({"teacher", routed} if cfg.route.enabled else set())
    dev = read_split(ctx.inputs["prepare"], "dev") if need_dev else []
    for label, load, messages_of in candidates:
        mine = examples[: ecfg.shipped_teacher_examples] if label == "teacher_shipped" else examples  # a baseline may be capped
        t0 = time.perf_counter()
        with PeakMemory() as mem:
            endpoint = load()
            rows, new_tokens, batch_s = quality_pass(label, endpoint, messages_of, mine, ecfg.batch_size, ecfg.max_new_tokens,
                                                     measures, ecfg.max_tool_steps, constraint_of.get(label))  # fmt: skip
            latencies = latency_pass(label, endpoint, messages_of, mine, ecfg.latency_requests, ecfg.max_new_tokens,
                                     constraint_of.get(label))  # fmt: skip
            if label == "teacher" and teacher.context != "none" and ecfg.latency_requests:  # what the context costs
                bare = latency_pass("teacher without context", endpoint, lambda e: task.teacher_messages(e, "none"),
                                    examples, ecfg.latency_requests, ecfg.max_new_tokens)  # fmt: skip
                extra_of.setdefault(label, {})["latency_p50_ms_without_context"] = round(1000 * percentile(bare, 50), 1)
            if label in need_dev:  # the temperature fit (student) and the cascade threshold (teacher, routed student)
                dev_rows_of[label], _, _ = quality_pass(f"{label} dev", endpoint, messages_of, dev, ecfg.batch_size,
                                                        ecfg.max_new_tokens, measures, ecfg.max_tool_steps)  # fmt: skip
        local = local_model(endpoint)
        size = (models.n_params(local), round(models.weight_bytes(local) / 2**20, 1)) if local is not None else None
        in_process = local is not None or hasattr(endpoint, "weight_mb")
        if hasattr(endpoint, "weight_mb"):  # a GGUF on llama.cpp: its file's size
            size = (None, endpoint.weight_mb)
        ctx.timings[f"{label}_s"] = round(time.perf_counter() - t0, 3)  # load, held-out, latency and dev passes
        if ecfg.dtype and local is not None:  # what the model ran in (read off its weights), beside the figures
            extra_of.setdefault(label, {})["dtype"] = str(next(local.parameters()).dtype).removeprefix("torch.")
        measured[label] = (rows, latencies, new_tokens, batch_s, size, mem.mb if in_process else None)
        rows_of[label] = rows
        del endpoint, local
    chosen = choose_confidence(dev_rows_of["student"], ecfg) if auto_confidence else None
    ecfg_used = ecfg.model_copy(update={"confidence": chosen["signal"]}) if chosen else ecfg
    for label, (rows, latencies, new_tokens, batch_s, size, peak) in measured.items():
        results[label] = summarize(rows, latencies, new_tokens, batch_s, ecfg_used, ecfg.metrics, price, seed, size, peak)
        results[label].update(extra_of.get(label, {}))
    measured.clear()
    scratch.cleanup()
    for label in results:
        results[label]["engine"] = ecfg.engine if label not in ("teacher", "teacher_shipped") or cfg.teacher.backend == "hf" else "remote"
    if chosen:
        results["student"]["confidence_choice"] = chosen
    if ecfg.fit_temperature:
        results["student"]["temperature_fit"] = fit_on_dev(dev_rows_of["student"], rows_of["student"], ecfg_used)
    deltas = paired_deltas(rows_of["teacher"], rows_of["student"], ecfg.metrics, seed)
    out = {"split": ecfg.split, "seed": seed, "models": results, "deltas_student_vs_teacher": deltas,
           "drift_vs_teacher": {label: drift(rows_of["teacher"], rows_of[label]) for label in results if label != "teacher"}}  # fmt: skip
    if "previous" in results:
        out["deltas_student_vs_previous"] = paired_deltas(rows_of["previous"], rows_of["student"], ecfg.metrics, seed)
    if "pool_only" in results:  # what distillation adds over the labelled pool alone
        out["deltas_student_vs_pool_only"] = paired_deltas(rows_of["pool_only"], rows_of["student"], ecfg.metrics, seed)
    if "student_constrained" in results:  # what the grammar changes: same model, same examples (ratios > 1: constrained is slower)
        c, f = results["student_constrained"], results["student"]
        out["constrained_vs_student"] = {
            "deltas": metrics.deltas(rows_of["student"], rows_of["student_constrained"], ecfg.metrics, None, seed)["all"],
            "latency_p50_ratio": round(c["latency_p50_ms"] / max(f["latency_p50_ms"], 1e-9), 3),
            "time_per_token_ratio": round(f["tokens_per_s"] / max(c["tokens_per_s"], 1e-9), 3),
        }  # fmt: skip
    if "teacher_shipped" in results:  # what teacher correction bought
        out["deltas_teacher_vs_shipped"] = paired_deltas(rows_of["teacher_shipped"], rows_of["teacher"], ecfg.metrics, seed)
    for label in results:
        if label == routed and label != "student":  # the quantized student against the float one, same examples
            out[f"deltas_{label}_vs_student"] = {"all": metrics.deltas(rows_of["student"], rows_of[label], ecfg.metrics, None, seed)["all"]}
            out[f"speed_{label}_vs_student"] = {
                "latency_p50_ratio": round(results["student"]["latency_p50_ms"] / max(results[label]["latency_p50_ms"], 1e-9), 3),
                "batch_tokens_per_s_ratio": round(results[label]["tokens_per_s"] / max(results["student"]["tokens_per_s"], 1e-9), 3),
                "batch_requests_per_s_ratio": round(results[label]["requests_per_s"] / max(results["student"]["requests_per_s"], 1e-9), 3),
                "batch_requests_per_s_vs_teacher": round(results[label]["requests_per_s"] / max(results["teacher"]["requests_per_s"], 1e-9), 3),
            }  # fmt: skip
    if cfg.route.enabled:
        pick = lambda rows: {"teacher": rows["teacher"], "student": rows[routed]}  # noqa: E731
        out["cascade"] = {"student": routed, **routing.fit_and_evaluate(pick(dev_rows_of), pick(rows_of), cfg.route, seed)}
    out["served"] = routed  # the form the gates judge: what the registry ships and the cascade answers with
    decision = gates.verdict(out, ecfg.gates, cfg.targets)
    atomic.write_json(ctx.dir / "results.json", out)
    atomic.write_json(ctx.dir / "verdict.json", decision)
    atomic.write_jsonl(ctx.dir / "outputs.jsonl", [r for rows in rows_of.values() for r in rows])
    print_summary(out, decision)
    ctx.counts.update(examples=len(examples), gates_passed=decision["passed"],
                      **{f"{k}_task_success": v["metrics"]["task_success"]["mean"] for k, v in results.items()})  # fmt: skip


def paired_deltas(base_rows: list[dict], rows: list[dict], names: list[str], seed: int) -> dict:
    """rows - base_rows on the same examples, overall, per layer, per slice and per tag."""
    out = {per: metrics.deltas(base_rows, rows, names, key, seed) for per, key in (("all", None), ("layer", "layer"), ("slice", "slice"))}
    out["tag"] = metrics.deltas_by_tag(base_rows, rows, names, seed)
    return out


def choose_confidence(dev_rows: list[dict], ecfg) -> dict:
    """``eval.confidence: auto``: the signal whose confidences are best calibrated on the student's dev
    answers (lowest ECE; ties to the earlier of mean, min, sequence). Fixed by rule on dev before any
    held-out figure is read."""
    correct = [r["metrics"]["task_success"] for r in dev_rows]
    eces = {sig: round(calibration.ece([routing.confidence(r, sig) for r in dev_rows], correct, ecfg.calibration_bins), 4)
            for sig in routing.SIGNALS}  # fmt: skip
    return {"signal": min(eces, key=lambda sig: (eces[sig], list(routing.SIGNALS).index(sig))), "dev_ece": eces, "dev_examples": len(dev_rows)}


def external(cfg) -> dict[str, str]:
    """The previous student's weights (``eval.previous``), part of this stage's key."""
    e = cfg.eval
    return {} if e.previous is None else {"previous_model": models.weights_hash(versions.model_folder(e.previous, e.registry))}


def drift(teacher_rows: list[dict], rows: list[dict]) -> dict:
    """How a model's outputs drift from the teacher's on the same examples: length (new tokens, in
    characters too) and format validity. A preference-trained student that wins by writing longer or
    by dropping the format shows here."""
    mean = lambda rs, f: statistics.fmean(f(r) for r in rs) if rs else 0.0  # noqa: E731
    t_tokens, m_tokens = mean(teacher_rows, lambda r: r["new_tokens"]), mean(rows, lambda r: r["new_tokens"])
    fmt = lambda rs: mean(rs, lambda r: r["metrics"].get("format_validity") or 0.0)  # noqa: E731
    return {"mean_new_tokens": round(m_tokens, 2), "teacher_mean_new_tokens": round(t_tokens, 2),
            "length_ratio": round(m_tokens / t_tokens, 3) if t_tokens else None,
            "mean_chars": round(mean(rows, lambda r: len(r["output"])), 1), "teacher_mean_chars": round(mean(teacher_rows, lambda r: len(r["output"])), 1),
            "format_validity_delta": round(fmt(rows) - fmt(teacher_rows), 4)}  # fmt: skip


def fit_on_dev(dev_rows: list[dict], eval_rows: list[dict], ecfg) -> dict:
    """A confidence temperature fitted on dev, applied to the eval split's confidences."""
    key = routing.SIGNALS[ecfg.confidence]
    t = calibration.fit_temperature([r[key] for r in dev_rows], [r["metrics"]["task_success"] for r in dev_rows])
    conf = calibration.scaled([r[key] for r in eval_rows], t)
    correct = [r["metrics"]["task_success"] for r in eval_rows]
    return {"temperature": round(t, 4), "dev_examples": len(dev_rows), "ece": round(calibration.ece(conf, correct, ecfg.calibration_bins), 4),
            "brier": round(calibration.brier(conf, correct), 4)}  # fmt: skip


def _ci(s: dict) -> str:
    if s.get("mean") is None:
        return "-"
    return f"{100 * s['mean']:.1f}% [{100 * s['lo']:.1f}, {100 * s['hi']:.1f}] n={s['n']}"


def print_summary(out: dict, decision: dict) -> None:
    console = Console(stderr=True)
    t, s = out["models"]["teacher"], out["models"]["student"]
    table = Table(title=f"task success per layer ({out['split']} split, 95% bootstrap intervals)")
    for col in ("layer", "teacher", "student", "student - teacher"):
        table.add_column(col)
    for layer in ["all", *sorted(t["per_layer"])]:
        tm = t["metrics"]["task_success"] if layer == "all" else t["per_layer"][layer]["task_success"]
        sm = s["metrics"]["task_success"] if layer == "all" else s["per_layer"].get(layer, {}).get("task_success", {})
        d = out["deltas_student_vs_teacher"]["all" if layer == "all" else "layer"][layer]["task_success"]
        delta = "-" if d["delta"] is None else f"{100 * d['delta']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]" + (" *" if d["significant"] else "")
        table.add_row(layer, _ci(tm), _ci(sm), delta)
    console.print(table)
    gt = Table(title=f"gates on {decision['model']}: " + ("PASSED" if decision["passed"] else "FAILED"))
    for col in ("gate", "value", "threshold", "result"):
        gt.add_column(col)
    for g in decision["gates"]:
        worst = next((r for r in g["rows"] if not r["passed"]), g["rows"][0] if g["rows"] else {})
        where = f" ({', '.join(g['failed_groups'])})" if g["failed_groups"] and g["per"] != "all" else ""
        gt.add_row(g["name"] + where, str(worst.get("value")), str(worst.get("threshold")), "pass" if g["passed"] else "FAIL")
    console.print(gt)
