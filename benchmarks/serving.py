"""Serving figures of a finished run, all variants on the same requests in the same run.

    python benchmarks/serving.py [--run runs/demo] [--requests 24]

Variants, each through the server's own answer path (``stillroom.serve.answer``: render, tokenize,
generate, decode; HTTP excluded), one request at a time:

- ``teacher_with_context``: the teacher with its few-shot context (what the product served before);
- ``student``: the float student; ``student_int8``: the same student with int8 dynamic quantization;
- ``cascade``: the run's fitted cascade (eval/results.json), student first, teacher when unsure.

Requests are the run's held-out examples (the student's view of each). Prints JSON: p50 / p95
latency, requests/s, task success and (cascade) teacher share per variant, and the speed ratio of
the quantized student to the float one measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=80)
    args = ap.parse_args()

    import torch
    import yaml

    from stillroom import models
    from stillroom.engines import TorchEngine
    from stillroom.metrics import percentile
    from stillroom.plugins import registry
    from stillroom.serve import Slot, _teacher, answer
    from stillroom.stages.compress import read_recipe
    from stillroom.stages.prepare import read_split

    run = Path(args.run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    task = registry().get("task", cfg["data"]["task"])
    examples = read_split(run / "prepare", cfg["eval"]["split"])[: args.requests]
    results = json.loads((run / "eval" / "results.json").read_text())
    if "cascade" not in results:
        raise SystemExit(f"{run} has no fitted cascade: run it with route.enabled: true")
    cascade = {k: results["cascade"][k] for k in ("threshold", "signal", "verifier")}
    teacher = _teacher(cfg["teacher"])
    student_dir = str(run / "train" / "model")
    float_model, tokenizer = models.load(student_dir)
    _, smoothing = read_recipe(run / "compress")
    int8_model, _ = models.load_quantized(student_dir, "int8_dynamic", smoothing=smoothing)
    routed = int8_model if results["cascade"].get("student", "student") != "student" else float_model
    slots = {
        "teacher_with_context": (Slot("teacher", teacher[0], 0.0), lambda e: task.teacher_messages(e, cfg["teacher"]["context"])),
        "student": (Slot("student", TorchEngine(float_model, tokenizer), 0.0), task.student_messages),
        "student_int8": (Slot("student_int8", TorchEngine(int8_model, tokenizer), 0.0), task.student_messages),
        "cascade": (Slot("cascade", TorchEngine(routed, tokenizer), 0.0, cascade=cascade, teacher=teacher, to_teacher=task.with_teacher_context),
                    task.student_messages),
    }  # fmt: skip
    out = {}
    for name, (slot, messages_of) in slots.items():
        answer(slot, messages_of(examples[0]), 4)  # warm-up, not counted
        latencies, successes, escalated = [], [], 0
        started = time.perf_counter()
        for e in examples:
            t0 = time.perf_counter()
            a = answer(slot, messages_of(e), args.max_tokens)
            latencies.append(time.perf_counter() - t0)
            successes.append(task.check(e, a.text).passed)
            escalated += a.served_by == "teacher"
        total = time.perf_counter() - started
        out[name] = {"p50_ms": round(1000 * percentile(latencies, 50), 1), "p95_ms": round(1000 * percentile(latencies, 95), 1),
                     "requests_per_s": round(len(examples) / total, 3), "task_success": round(statistics.fmean(successes), 4)}  # fmt: skip
        if name == "cascade":
            out[name]["teacher_share"] = round(escalated / len(examples), 4)
    ratios = {"student_int8_speedup_p50": round(out["student"]["p50_ms"] / out["student_int8"]["p50_ms"], 3),
              "student_int8_speedup_requests_per_s": round(out["student_int8"]["requests_per_s"] / out["student"]["requests_per_s"], 3),
              "student_speedup_vs_teacher_p50": round(out["teacher_with_context"]["p50_ms"] / out["student"]["p50_ms"], 3)}  # fmt: skip
    print(json.dumps({"benchmark": "serving", "run": str(run), "requests": len(examples), "max_tokens": args.max_tokens,
                      "cascade": cascade, "threads": torch.get_num_threads(), "results": out, "ratios": ratios}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
