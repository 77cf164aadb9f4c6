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
corrected teacher answers every single-turn held-out request (multi-step tasks need tool turns; the eval
stage has them) greedily, behind the prompt ``teacher.context`` gives it, in batches, with the eval stage's
token cap, and the task's own checker judges. Prints one JSON object: per teacher, the labelled records and
optimizer steps it trained on, the adapt stage's seconds, held-out task success with its 95% bootstrap
interval, on functions seen and never seen in training, and the paired difference against the first
pool's teacher on the same examples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path


def held_out(run: Path) -> list[dict]:
    from stillroom.config import load_config
    from stillroom.stages.prepare import read_split

    return read_split(run / "prepare", load_config(run / "config.yaml").eval.split)


def answer(folder: Path, examples: list[dict], messages_of, task, max_new_tokens: int, batch_size: int) -> dict[str, float]:
    from stillroom import generation, models

    model, tokenizer = models.load(str(folder))
    passed = {}
    for i in range(0, len(examples), batch_size):
        batch = examples[i : i + batch_size]
        out = generation.generate(model, tokenizer, [generation.render(tokenizer, messages_of(e)) for e in batch], max_new_tokens=max_new_tokens)
        passed.update({e["id"]: float(task.check(e, g.text).passed) for e, g in zip(batch, out)})
    return passed


def summary(passed: dict[str, float], unseen: set[str], seed: int) -> dict:
    from stillroom.metrics import bootstrap_ci

    def block(ids):
        values = [passed[i] for i in ids]
        lo, hi = bootstrap_ci(values, seed)
        return {"n": len(values), "task_success": round(sum(values) / len(values), 4), "lo": round(lo, 4), "hi": round(hi, 4)}

    return {"all": block(sorted(passed)), "seen_functions": block(sorted(set(passed) - unseen)),
            "unseen_functions": block(sorted(set(passed) & unseen))}  # fmt: skip


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

    first = next(iter(teachers.values()))
    examples = held_out(first)
    fingerprint = lambda rows: hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()  # noqa: E731
    for label, run in teachers.items():
        if fingerprint(held_out(run)) != fingerprint(examples):
            sys.exit(f"{label} ({run}) was measured on another held-out split than {first}: not comparable")
    cfg = load_config(first / "config.yaml")
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
        verdicts[label] = answer(run / "adapt" / "model", single, messages_of, task, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        row = {"run": str(run), "reference_examples": load_config(run / "config.yaml").data.reference_examples,
               "labelled_records": counts.get("train_examples"), "steps": counts.get("steps"),
               "adapt_seconds": manifest.get("timings", {}).get("total_s"), "eval_seconds": round(time.time() - t1, 1),
               **summary(verdicts[label], unseen, cfg.run.seed)}  # fmt: skip
        if label != next(iter(teachers)):
            row["minus_first"] = paired_delta(verdicts[label], verdicts[next(iter(teachers))], cfg.run.seed)
        out["teachers"][label] = row
        print(json.dumps({label: row}), file=sys.stderr, flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
