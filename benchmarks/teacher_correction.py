"""Teacher correction against the size of the labelled pool: how much labelled data the demo's teacher
needs before it is competent at the task, measured on one held-out split.

    python benchmarks/teacher_correction.py --pools 700 1400 [--baseline-run runs/demo] [--config CFG] [--set k=v ...]

For each value of ``data.reference_examples`` in ``--pools``, a run ``tc-<value>`` of the config (the
built-in demo by default) is brought up to ``adapt`` through the pipeline (``prepare``, then ``adapt``:
the teacher fine-tuned on the labelled pool that many reference examples yield, after deduplication and
the contamination check; cached like any run). ``--baseline-run`` adds a finished run's corrected teacher
(``adapt/model``) measured in this same process, so a pool point can be compared with the model a demo
run shipped without training it again; its held-out split must be the same examples (checked).

The held-out split does not move with the pool (``prepare`` builds it from ``data.n_examples``). Every
corrected teacher answers every single-turn held-out request behind the prompt ``teacher.context`` gives
it, through the eval stage's own pass (``evaluate.quality_pass``: greedy, batched, its token cap, the task's
checker). Prints one JSON object: per teacher, the labelled records and
optimizer steps it trained on, the adapt stage's seconds, held-out task success with its 95% bootstrap
interval, on functions seen and never seen in training, and the paired difference against the first
pool's teacher on the same examples.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def answer(label: str, folder: Path, examples: list[dict], messages_of, ecfg) -> dict[str, float]:
    """Each example's task success (1.0 / 0.0) as the eval stage measures it: its greedy pass, batched,
    with its token cap, judged by the task's checker."""
    from stillroom import metrics
    from stillroom.stages.evaluate import quality_pass
    from stillroom.teachers import HFTeacher

    rows, _, _ = quality_pass(label, HFTeacher.load(str(folder)), messages_of, examples, ecfg.batch_size, ecfg.max_new_tokens,
                              {"task_success": metrics.build("task_success")}, ecfg.max_tool_steps)  # fmt: skip
    return {r["example_id"]: r["metrics"]["task_success"] for r in rows}


def summary(passed: dict[str, float], unseen: set[str], seed: int) -> dict:
    from stillroom.metrics import summary as interval

    return {"all": interval(list(passed.values()), seed), "seen_functions": interval([v for i, v in passed.items() if i not in unseen], seed),
            "unseen_functions": interval([v for i, v in passed.items() if i in unseen], seed)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", type=int, nargs="+", required=True, help="data.reference_examples values, one corrected teacher each")
    ap.add_argument("--baseline-run", type=Path, help="a finished run whose adapt/model is measured beside the pools")
    ap.add_argument("--config", default=None, help="pipeline config (default: the built-in demo)")
    ap.add_argument("--set", action="append", default=[], help="override applied to every pool's run")
    args = ap.parse_args()

    from stillroom.cli import DEMO_CONFIG
    from stillroom.config import load_config
    from stillroom.metrics import paired_delta
    from stillroom.plugins import registry
    from stillroom.stages.prepare import read_split, split_hash

    config = args.config or str(DEMO_CONFIG)
    teachers, t0 = {}, time.time()
    for pool in args.pools:
        overrides = [*args.set, f"run.name=tc-{pool}", f"data.reference_examples={pool}"]
        code = subprocess.run([sys.executable, "-m", "stillroom.cli", "adapt", config, *overrides]).returncode
        if code != 0:
            sys.exit(f"stillroom adapt {config} {' '.join(overrides)} failed (exit {code})")
        cfg = load_config(Path(config), overrides)
        teachers[f"pool_{pool}"] = Path(cfg.run.dir) / cfg.run.name
    if args.baseline_run:
        teachers["baseline_run"] = args.baseline_run

    first_label, first = next(iter(teachers.items()))
    cfg = load_config(first / "config.yaml")
    examples = read_split(first / "prepare", cfg.eval.split)
    held_out = split_hash(first / "prepare", cfg.eval.split)
    for label, run in teachers.items():
        if split_hash(run / "prepare", cfg.eval.split) != held_out:
            sys.exit(f"{label} ({run}) was measured on another held-out split than {first}: not comparable")
    task = registry().get("task", cfg.data.task)
    single = [e for e in examples if e["expected"].get("kind") != "trace"]
    unseen = {e["id"] for e in single if "unseen_function" in e.get("tags", [])}
    messages_of = lambda e: task.teacher_messages(e, cfg.teacher.context)  # noqa: E731

    out = {"config": config, "held_out": len(single), "unseen_functions": len(unseen), "teacher_context": cfg.teacher.context,
           "max_new_tokens": cfg.eval.max_new_tokens, "teachers": {}}  # fmt: skip
    verdicts = {}
    for label, run in teachers.items():
        manifest = json.loads((run / "adapt" / "manifest.json").read_text())
        counts = manifest["counts"]
        t1 = time.time()
        verdicts[label] = answer(label, run / "adapt" / "model", single, messages_of, cfg.eval)
        row = {"run": str(run), "reference_examples": load_config(run / "config.yaml").data.reference_examples,
               "labelled_records": counts.get("train_examples"), "steps": counts.get("steps"),
               "adapt_seconds": manifest.get("timings", {}).get("total_s"), "eval_seconds": round(time.time() - t1, 1),
               **summary(verdicts[label], unseen, cfg.run.seed)}  # fmt: skip
        if label != first_label:
            row["minus_first"] = paired_delta(verdicts[label], verdicts[first_label], cfg.run.seed)
        out["teachers"][label] = row
        print(json.dumps({label: row}), file=sys.stderr, flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
