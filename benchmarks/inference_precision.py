"""What bfloat16 weights buy at inference on this machine, and what they cost: a finished run's models
answer its held-out examples in float32 and in bfloat16, through the eval stage's own pass.

    python benchmarks/inference_precision.py --run runs/demo [--models teacher student] [--examples 96]

The demo labels in float32 (``teacher.dtype``) and evaluates in bfloat16 (``eval.dtype``, on this
script's evidence; float32 before a5818f2). A CPU with AMX or
AVX512-BF16 runs bfloat16 matmuls faster, and much of the eval and generate stages' time is prompt
prefill, a batch of matmuls. Each model (``teacher``: the run's teacher, the corrected one
``adapt/model`` where ``adapt`` ran, in its teacher prompt view; ``student``: ``train/model``;
``pool_only``: ``baseline/model``) answers the first ``--examples`` held-out examples with ``evaluate.quality_pass`` (greedy, batched, the eval
config's token cap and tool steps), once per dtype, one right after the other, so both see the same
machine. Prints one JSON object: per model and dtype the pass's seconds (after one untimed warm-up
answer), requests/s, task success, and the share of answers identical to those the run's eval stage
recorded (the dtype the stage ran in should give 1.0: float32 unless ``eval.dtype`` says otherwise);
bfloat16 against float32: the speed-up (a ratio within one
process), the share of identical answers, and the paired task-success difference (bfloat16 − float32,
95% paired bootstrap). Nothing in the run is written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

FOLDERS = {"student": "train/model", "pool_only": "baseline/model"}  # the teacher: the run's effective one


def answer(label: str, folder: Path, dtype: str, examples: list[dict], messages_of, ecfg) -> tuple[list[dict], float]:
    """The eval stage's greedy pass over ``examples`` with the model loaded in ``dtype``; its rows and seconds."""
    from stillroom import metrics
    from stillroom.stages.evaluate import quality_pass
    from stillroom.teachers import HFTeacher

    endpoint = HFTeacher.load(str(folder), dtype)
    measures = {"task_success": metrics.build("task_success")}
    quality_pass(f"{label} {dtype} warm-up", endpoint, messages_of, examples[:1], 1, 4, measures, 1)  # first-call setup, untimed
    t0 = time.perf_counter()
    rows, _, _ = quality_pass(f"{label} {dtype}", endpoint, messages_of, examples, ecfg.batch_size, ecfg.max_new_tokens,
                              measures, ecfg.max_tool_steps)  # fmt: skip
    return rows, time.perf_counter() - t0


def compare(runs: dict[str, tuple[list[dict], float]], seed: int, recorded: dict[str, str]) -> dict:
    """Per dtype: seconds, requests/s, task success, and the share of answers identical to the eval stage's
    recorded ones (``recorded``: example id -> answer); bfloat16 against float32:
    speed-up, identical answers, paired task-success difference."""
    from stillroom import metrics

    out = {}
    for dtype, (rows, seconds) in runs.items():
        out[dtype] = {"seconds": round(seconds, 4), "requests_per_s": round(len(rows) / seconds, 4),
                      "task_success": metrics.summary([r["metrics"]["task_success"] for r in rows], seed)}  # fmt: skip
        if recorded:
            out[dtype]["same_as_eval_stage"] = round(sum(recorded.get(r["example_id"]) == r["output"] for r in rows) / len(rows), 4)
    if {"float32", "bfloat16"} <= set(runs):
        (f_rows, f_s), (b_rows, b_s) = runs["float32"], runs["bfloat16"]
        same = sum(a["output"] == b["output"] for a, b in zip(f_rows, b_rows))
        out["bfloat16_vs_float32"] = {
            "speedup": round(f_s / b_s, 3),
            "identical_answers": round(same / len(f_rows), 4),
            "task_success_delta": metrics.deltas(f_rows, b_rows, ["task_success"], None, seed)["all"]["task_success"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="a run whose train (and adapt, baseline) stages finished")
    ap.add_argument("--models", nargs="+", default=["teacher", "student"], choices=["teacher", *sorted(FOLDERS)])
    ap.add_argument("--examples", type=int, default=96, help="the first N held-out examples")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    args = ap.parse_args()

    from stillroom import atomic
    from stillroom.config import load_config
    from stillroom.pipeline import effective_teacher
    from stillroom.plugins import registry
    from stillroom.stages.prepare import read_split

    cfg = load_config(args.run / "config.yaml")
    task = registry().get("task", cfg.data.task)
    examples = read_split(args.run / "prepare", cfg.eval.split)[: args.examples]
    teacher = effective_teacher(cfg, args.run)
    messages_of = {"teacher": lambda e: task.teacher_messages(e, teacher.context)}
    outputs = args.run / "eval" / "outputs.jsonl"
    answers = atomic.read_jsonl(outputs) if outputs.exists() else []
    out = {"run": str(args.run), "examples": len(examples), "batch_size": cfg.eval.batch_size, "models": {}}
    for label in args.models:
        folder = Path(teacher.model) if label == "teacher" else args.run / FOLDERS[label]
        if label != "teacher" and not any(folder.glob("*.safetensors")):
            sys.exit(f"{folder}: no model weights; has the run's {FOLDERS[label].split('/')[0]} stage finished?")
        with contextlib.redirect_stdout(sys.stderr):  # the progress bars; stdout carries the JSON alone
            runs = {dtype: answer(label, folder, dtype, examples, messages_of.get(label, task.student_messages), cfg.eval)
                    for dtype in args.dtypes}  # fmt: skip
        out["models"][label] = compare(runs, cfg.run.seed, {r["example_id"]: r["output"] for r in answers if r["model"] == label})
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
