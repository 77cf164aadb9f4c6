"""Serving figures of a finished run, all variants on the same requests in the same run.

    python benchmarks/serving.py [--run runs/demo] [--requests 24] [--engines torch llamacpp] [--gguf-formats q8_0 q4_0]

Variants, each through the server's own answer path (``stillroom.serve.answer``: render, tokenize,
generate, decode; HTTP excluded), one request at a time:

- ``teacher_with_context``: the teacher as shipped with its few-shot context (what the product served
  before; ``eval.shipped_teacher_context`` where the run corrected its teacher, else ``teacher.context``);
- ``corrected_teacher``: where the run corrected its teacher (``adapt``), that teacher prompted as the run
  prompted it (``teacher.context``): the model the student replaces and the cascade escalates to;
- ``student``: the float student; ``student_int8``: the same student with int8 dynamic quantization;
- ``cascade``: the run's fitted cascade (eval/results.json), student first, the run's teacher (the
  corrected one where there is one, ``registry.served_teacher``) when unsure.

With ``llamacpp`` among ``--engines`` (llama-cpp-python installed), on llama.cpp:

- ``teacher_with_context_llamacpp``: the shipped teacher's GGUF with its context: the default teacher's
  file as shipped (Q4_1), another teacher folder exported to ``--teacher-format``;
- ``corrected_teacher_llamacpp``: the corrected teacher exported to ``--teacher-format``;
- ``student_llamacpp_<format>``: the student exported to each of ``--gguf-formats`` (smoothing folded).

``--variants`` runs only the named rows (ratios need both of their rows).

The llamacpp engine reuses the KV cache of the prefix a request shares with the previous one (the
teacher's few-shot context is computed once, as a llama.cpp server with prompt caching does); the torch
rows process every prompt whole, as `stillroom serve` on torch does. Requests are the run's held-out
examples (the student's view of each). Prints JSON: p50 / p95 latency, requests/s, task success and
(cascade) teacher share per variant, and speed ratios measured in this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=80)
    ap.add_argument("--engines", nargs="+", default=["torch", "llamacpp"], choices=["torch", "llamacpp"])
    ap.add_argument("--gguf-formats", nargs="+", default=["q8_0", "q4_0"], choices=["f16", "q8_0", "q4_0"])
    ap.add_argument("--teacher-format", default="q8_0", choices=["f16", "q8_0", "q4_0"], help="a non-default teacher's GGUF format")
    ap.add_argument("--variants", nargs="+", help="only these rows (default: all)")
    args = ap.parse_args()
    wanted = lambda name: args.variants is None or name in args.variants  # noqa: E731

    import torch
    import yaml

    from stillroom import models
    from stillroom.config import load_config
    from stillroom.engines import TorchEngine, llamacpp_available
    from stillroom.metrics import percentile
    from stillroom.plugins import registry
    from stillroom.registry import served_teacher
    from stillroom.serve import Slot, _teacher, answer
    from stillroom.stages.compress import read_recipe
    from stillroom.stages.prepare import read_split

    run = Path(args.run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    task = registry().get("task", cfg["data"]["task"])
    examples = read_split(run / "prepare", cfg["eval"]["split"])[: args.requests]
    results = json.loads((run / "eval" / "results.json").read_text())
    cascade = {k: results["cascade"][k] for k in ("threshold", "signal", "verifier")} if "cascade" in results else None
    corrected = (run / "adapt" / "model").exists() and cfg.get("adapt", {}).get("enabled", False)
    shipped_context = cfg["eval"].get("shipped_teacher_context", "few_shot") if corrected else cfg["teacher"]["context"]
    with_context = lambda e: task.teacher_messages(e, shipped_context)  # noqa: E731
    as_run_prompts = lambda e: task.teacher_messages(e, cfg["teacher"]["context"])  # noqa: E731
    escalate_spec = served_teacher(run, load_config(run / "config.yaml"))  # the cascade's teacher, as `stillroom register` records it
    to_escalated = task.with_teacher_context if escalate_spec.get("context", "few_shot") != "none" else list
    student_dir = str(run / "train" / "model")
    smoothing = read_recipe(run / "compress")[1] if (run / "compress" / "recipe.json").exists() else None
    slots, notes = {}, {}
    if "torch" in args.engines:
        float_model, tokenizer = models.load(student_dir)
        int8_model, _ = models.load_quantized(student_dir, "int8_dynamic", smoothing=smoothing)
        if wanted("teacher_with_context"):
            slots["teacher_with_context"] = (Slot("teacher", _teacher({**cfg["teacher"], "context": shipped_context})[0], 0.0), with_context)
        if corrected and wanted("corrected_teacher"):
            slots["corrected_teacher"] = (Slot("corrected_teacher", _teacher(escalate_spec)[0], 0.0), as_run_prompts)
        slots["student"] = (Slot("student", TorchEngine(float_model, tokenizer), 0.0), task.student_messages)
        slots["student_int8"] = (Slot("student_int8", TorchEngine(int8_model, tokenizer), 0.0), task.student_messages)
        if cascade is not None:
            routed = int8_model if results["cascade"].get("student", "student") != "student" else float_model
            slots["cascade"] = (Slot("cascade", TorchEngine(routed, tokenizer), 0.0, cascade=cascade, teacher=_teacher(escalate_spec),
                                     to_teacher=to_escalated), task.student_messages)  # fmt: skip
        else:
            notes["cascade"] = f"{run} has no fitted cascade (route.enabled: false)"
    scratch = tempfile.TemporaryDirectory(prefix="stillroom-bench-gguf-")
    if "llamacpp" in args.engines and llamacpp_available() is not None:
        notes["llamacpp"] = llamacpp_available()
    elif "llamacpp" in args.engines:
        from transformers import AutoTokenizer

        from stillroom import export
        from stillroom.engines import LlamaCppEngine

        t_spec = cfg["teacher"]
        if t_spec.get("backend", "hf") == "hf" and wanted("teacher_with_context_llamacpp"):
            t_dir = models.resolve(t_spec["model"])
            if t_spec["model"] == "default":
                t_gguf, notes["teacher_gguf"] = models.default_gguf(), "as shipped (Q4_1)"
            else:
                t_gguf = export.export_model(t_dir, Path(scratch.name) / "teacher", [args.teacher_format])[args.teacher_format]
                notes["teacher_gguf"] = f"{t_dir} exported to {args.teacher_format}"
            slots["teacher_with_context_llamacpp"] = (Slot("teacher", LlamaCppEngine(t_gguf, AutoTokenizer.from_pretrained(t_dir)), 0.0),
                                                      with_context)  # fmt: skip
        if corrected and wanted("corrected_teacher_llamacpp"):
            c_dir = run / "adapt" / "model"
            c_gguf = export.export_model(c_dir, Path(scratch.name) / "corrected", [args.teacher_format])[args.teacher_format]
            notes["corrected_teacher_gguf"] = f"{c_dir} exported to {args.teacher_format}"
            slots["corrected_teacher_llamacpp"] = (Slot("corrected_teacher", LlamaCppEngine(c_gguf, AutoTokenizer.from_pretrained(c_dir)), 0.0),
                                                   as_run_prompts)  # fmt: skip
        s_tokenizer = AutoTokenizer.from_pretrained(student_dir)
        written = export.export_model(student_dir, Path(scratch.name) / "student", args.gguf_formats, smoothing)
        for fmt, path in written.items():
            slots[f"student_llamacpp_{fmt}"] = (Slot(fmt, LlamaCppEngine(path, s_tokenizer), 0.0), task.student_messages)
    out = {}
    for name, (slot, messages_of) in slots.items():
        if not wanted(name):
            continue
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
        out[name] = {"engine": slot.engine.name, "p50_ms": round(1000 * percentile(latencies, 50), 1),
                     "p95_ms": round(1000 * percentile(latencies, 95), 1), "requests_per_s": round(len(examples) / total, 3),
                     "task_success": round(statistics.fmean(successes), 4)}  # fmt: skip
        if name == "cascade":
            out[name]["teacher_share"] = round(escalated / len(examples), 4)
    scratch.cleanup()

    def ratio(a, b, key="p50_ms"):  # how many times faster a is than b
        return round(out[b][key] / out[a][key], 3) if a in out and b in out else None

    ratios = {"student_int8_speedup_p50": ratio("student_int8", "student"),
              "student_int8_speedup_requests_per_s": ratio("student", "student_int8", "requests_per_s"),
              "student_speedup_vs_teacher_p50": ratio("student", "teacher_with_context"),
              "student_speedup_vs_corrected_teacher_p50": ratio("student", "corrected_teacher"),
              "student_int8_speedup_vs_corrected_teacher_requests_per_s": ratio("corrected_teacher", "student_int8", "requests_per_s")}  # fmt: skip
    for fmt in args.gguf_formats:
        ratios[f"student_llamacpp_{fmt}_speedup_vs_teacher_llamacpp_p50"] = ratio(f"student_llamacpp_{fmt}", "teacher_with_context_llamacpp")
        ratios[f"student_llamacpp_{fmt}_speedup_vs_student_int8_p50"] = ratio(f"student_llamacpp_{fmt}", "student_int8")
        ratios[f"student_llamacpp_{fmt}_speedup_vs_corrected_teacher_llamacpp_p50"] = ratio(f"student_llamacpp_{fmt}", "corrected_teacher_llamacpp")
    print(json.dumps({"benchmark": "serving", "run": str(run), "requests": len(examples), "max_tokens": args.max_tokens,
                      "cascade": cascade, "threads": torch.get_num_threads(), "results": out,
                      "ratios": {k: v for k, v in ratios.items() if v is not None}, "notes": notes}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
