"""Distillation variants on the same data, student, seed and step budget, measured on the held-out split.

    python benchmarks/distill_variants.py                       # one run per signal kind on the demo
    python benchmarks/distill_variants.py --variant name=train.kd_loss=jsd,train.kd_weight=1 ...

The default variants are one per teacher-signal kind, each learning from the clean references plus its
own signal, all with the same step budget (``train.max_steps``):
sequence (teacher sequences, SFT), logit (the teacher's top-k, KD), preference (DPO on ranked pairs),
tool_trace (the teacher's multi-step traces), self (the `sequence` variant's student generates,
verifiers and the teacher filter, capped share; evaluated against that student as `previous`) and
on_policy (the student trains on the references, then one round on its own samples of the train
prompts scored by the teacher, reverse KL; that round's steps come on top of the budget and the
table's step column counts them).

The base run (default: the demo's ``runs/demo``) is brought up to date through ``mix`` once; each
variant gets a copy of those data stages (so teacher signals are generated once and every variant
reads the identical signal store), then runs the stages its signal needs, train, eval and report under
``runs/<base>-<variant>``. Prints one JSON object: per variant, the overrides, seed, training steps,
and held-out task success (with its 95% bootstrap interval) overall, per layer and on the multi-step
slice, format validity and length drift against the teacher, next to the teacher's on the same
examples; also written to ``runs/<base>-variants.json``, and the "distillation variants" table to
``runs/<base>-variants.md``. A variant whose student fails its gates is a result (exit status 3 of
`stillroom run`), not an error.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

BUDGET = ["train.max_steps=60", "train.epochs=50", "compress.quantize=none", "route.enabled=false", "eval.latency_requests=2"]
ONLY = "train.sft_weight=0,train.kd_weight=0"
DEFAULT_VARIANTS = [
    f"sequence=signals.kind=[sequence],{ONLY},train.sft_weight=1",
    f"logit=signals.kind=[logit],{ONLY},train.kd_weight=1",
    f"preference=signals.kind=[preference],{ONLY},train.pref_weight=1",
    f"tool_trace=signals.kind=[tool_trace],{ONLY},train.trace_weight=1",
    f"self=signals.kind=[self],{ONLY},train.self_weight=1,data.mixture.sources=[reference],"
    "signals.self.model={run_dir}-sequence/train/model,"
    "eval.previous={run_dir}-sequence/train/model",
    f"on_policy=signals.kind=[on_policy],{ONLY},train.on_policy_weight=1,data.mixture.sources=[reference]",
]
DATA_STAGES = ("prepare", "adapt", "generate", "select", "mix")  # the corrected teacher too: every variant learns from the same one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="pipeline config (default: the built-in demo)")
    ap.add_argument("--variant", action="append", help="NAME=override[,override...]; repeatable")
    ap.add_argument("--set", action="append", default=[], help="override applied to the base and every variant")
    ap.add_argument("--only", action="append", help="run only these default variants (names); repeatable")
    args = ap.parse_args()
    if not args.variant:
        args.set = [*BUDGET, *args.set]

    from stillroom.cli import DEMO_CONFIG
    from stillroom.config import load_config
    from stillroom.pipeline import run_dir

    config = Path(args.config) if args.config else DEMO_CONFIG
    base_cfg = load_config(config, args.set)
    base = run_dir(base_cfg)
    stillroom = [sys.executable, "-m", "stillroom.cli"]
    subprocess.run([*stillroom, "mix", str(config), *args.set], check=True)

    out = {"config": str(config), "seed": base_cfg.run.seed, "base_run": str(base), "variants": {}}
    specs = args.variant or [v for v in DEFAULT_VARIANTS if not args.only or v.split("=", 1)[0] in args.only]
    for spec in specs:
        name, _, overrides = spec.partition("=")
        overrides = overrides.replace("{run_dir}", str(base.resolve()))
        sets = [*args.set, *split_overrides(overrides), f"run.name={base.name}-{name}"]
        cfg = load_config(config, sets)  # validates the variant before anything runs
        target = run_dir(cfg)
        target.mkdir(parents=True, exist_ok=True)
        for stage in DATA_STAGES:  # the same data for every variant
            if (target / stage).exists():
                shutil.rmtree(target / stage)
            shutil.copytree(base / stage, target / stage, ignore=shutil.ignore_patterns(".*"))
        code = subprocess.run([*stillroom, "run", str(config), *sets]).returncode
        if code not in (0, 3):  # 3: the run finished and a gate failed, which is a result, not an error
            raise SystemExit(f"variant {name} failed with exit status {code}")
        results = json.loads((target / "eval" / "results.json").read_text())
        train = json.loads((target / "train" / "manifest.json").read_text())["counts"]
        student, teacher = results["models"]["student"], results["models"]["teacher"]
        layer = lambda m: {k: v["task_success"] for k, v in m["per_layer"].items()}  # noqa: E731
        out["variants"][name] = {
            "overrides": sets[len(args.set):-1], "run": str(target), "steps": train["steps"], "kd_rows": train.get("kd_rows"),
            "final_train_loss": train["final_train_loss"], "best_dev_loss": train["best_dev_loss"],
            "task_success": student["metrics"]["task_success"], "format_validity": student["metrics"]["format_validity"],
            "per_layer_task_success": layer(student), "failure_reasons": student["failure_reasons"],
            "multi_step_task_success": student["per_slice"].get("multi_step", {}).get("task_success"),
            "teacher_multi_step_task_success": teacher["per_slice"].get("multi_step", {}).get("task_success"),
            "length_ratio_vs_teacher": results.get("drift_vs_teacher", {}).get("student", {}).get("length_ratio"),
            "records_by_source": train.get("records_by_source"), "pair_rows": train.get("pair_rows"), "trace_rows": train.get("trace_rows"),
            **({"task_success_minus_previous": results["deltas_student_vs_previous"]["all"]["all"]["task_success"]}
               if "deltas_student_vs_previous" in results else {}),
            "teacher_task_success": teacher["metrics"]["task_success"], "teacher_per_layer_task_success": layer(teacher),
            "delta_vs_teacher": results["deltas_student_vs_teacher"]["all"]["all"]["task_success"],
            "gates_passed": json.loads((target / "eval" / "verdict.json").read_text())["passed"],
        }  # fmt: skip
    from stillroom.metrics import paired_delta

    def student_success(name):  # per held-out example, from the variant's recorded answers
        rows = map(json.loads, (Path(out["variants"][name]["run"]) / "eval" / "outputs.jsonl").open())
        return {r["example_id"]: r["metrics"]["task_success"] for r in rows if r["model"] == "student"}

    base_variant = next(iter(out["variants"]))
    for name in list(out["variants"])[1:]:  # paired differences against the first variant, same examples
        out["variants"][name][f"task_success_minus_{base_variant}"] = paired_delta(student_success(base_variant), student_success(name), out["seed"])
    text = json.dumps(out, indent=2)
    (base.parent / f"{base.name}-variants.json").write_text(text + "\n")
    from stillroom.stages.report import to_markdown, variants_blocks

    (base.parent / f"{base.name}-variants.md").write_text(to_markdown(variants_blocks(out), ""))
    print(text)


def split_overrides(text: str) -> list[str]:
    """``a=1,b=[x, y],c=2`` -> ["a=1", "b=[x, y]", "c=2"]: commas inside brackets stay."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{" and 1 or 0
        depth -= ch in "]}" and 1 or 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in [*parts, cur] if p]


if __name__ == "__main__":
    main()
