"""The cascade under a teacher budget, from a finished run's recorded answers (nothing is re-run).

    python benchmarks/cascade_budget.py --run runs/demo [--max-share 0.4]

The eval stage fits the cascade's threshold on the dev split (the smallest teacher share that reaches
the target) and applies it unchanged to the held-out split. This asks the converse question, the one
a team with a serving budget asks: with at most ``--max-share`` of the requests sent to the teacher,
what task success can the cascade reach, and what teacher share does the teacher's own task success
need? Both are read off the held-out curve itself (every threshold's held-out success and share, the
same ``routing.curve`` the eval stage draws), so they are hindsight: an upper bound on what any
threshold fitted elsewhere reaches on these examples, not a fitted result.

For each first model the run evaluated (the int8 student, the float student, the pool-only student),
each confidence signal, with and without the format verifier. Also the verifier's floor: the share of
answers failing the format check (the verifier alone sends those), the teacher's task success on them,
and both per example tag (``unseen_function``...). Prints one JSON object; the eval stage's own fitted
cascade is repeated under ``fitted``, and ``dev_fit_within_budget`` is what ``route.max_teacher_share``
would have fitted on the run's stored dev curve (the fitted verifier setting's only), applied to the
held-out answers: a dev fit, not hindsight.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

FIRST_MODELS = ("student_int8", "student", "pool_only")


def budget(student: list[dict], teacher: list[dict], signal: str, verifier: bool, max_share: float, teacher_success: float, seed: int) -> dict:
    from stillroom import metrics, routing

    points = routing.curve(student, teacher, signal, verifier)
    out = {"lowest_share": min(p["teacher_share"] for p in points), "best_within_budget": None}
    best, _ = routing.choose(points, math.inf, max_share)  # nothing reaches infinity: the best task success within the budget
    if best["teacher_share"] <= max_share + 1e-12:  # else even the lowest threshold overspends it (the verifier's floor)
        success, share = routing.outcome(student, teacher, best["threshold"], signal, verifier)
        out["best_within_budget"] = {"task_success": metrics.summary(success, seed), "teacher_share": round(share, 4), "threshold": best["threshold"]}
    cheapest, reached = routing.choose(points, round(teacher_success, 4))
    out["share_to_reach_teacher"] = cheapest["teacher_share"] if reached else None
    return out


def mean(values) -> float:
    values = list(values)
    return round(sum(values) / max(len(values), 1), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo", help="a run whose eval stage finished")
    ap.add_argument("--max-share", type=float, default=0.4, help="the teacher budget: at most this share of requests")
    args = ap.parse_args()

    from stillroom import atomic, metrics, routing

    run = Path(args.run)
    results_path, outputs_path = run / "eval" / "results.json", run / "eval" / "outputs.jsonl"
    if not results_path.exists() or not outputs_path.exists():
        sys.exit(f"{run}: no finished eval stage ({results_path} and {outputs_path}); run `stillroom eval CONFIG` first")
    results = json.loads(results_path.read_text())
    seed = results.get("seed", 0)
    rows = atomic.read_jsonl(outputs_path)
    teacher = [r for r in rows if r["model"] == "teacher"]
    if not teacher:
        sys.exit(f"{outputs_path}: no answers of the teacher; the cascade needs them")
    by_id = {r["example_id"]: r for r in teacher}
    teacher_success = metrics.summary([r["metrics"]["task_success"] for r in teacher], seed)
    out = {"run": str(run), "max_share": args.max_share, "examples": len(teacher), "teacher_task_success": teacher_success,
           "hindsight": "thresholds read off the held-out curve itself: upper bounds, not fitted results", "first_models": {}}  # fmt: skip
    fitted = results.get("cascade")
    if fitted:
        out["fitted"] = {k: fitted[k] for k in ("student", "signal", "verifier", "threshold", "dev_examples", "dev", "eval") if k in fitted}
        # what route.max_teacher_share would have fitted: the run's dev curve (its fitted verifier setting only; the
        # other setting's dev curve is not stored) refitted under the budget, applied to the held-out answers
        chosen, reached = routing.choose(fitted["dev_curve"], fitted["target"], args.max_share)
        first = [r for r in rows if r["model"] == fitted.get("student", "student")]
        success, share = routing.outcome(first, teacher, chosen["threshold"], fitted["signal"], fitted["verifier"])
        out["dev_fit_within_budget"] = {
            "verifier": fitted["verifier"], "threshold": chosen["threshold"], "target_reached_on_dev": reached,
            "dev": {"task_success": chosen["task_success"], "teacher_share": chosen["teacher_share"]},
            "eval": {"task_success": metrics.summary(success, seed), "teacher_share": round(share, 4)},
        }  # fmt: skip
    for name in FIRST_MODELS:
        student = [r for r in rows if r["model"] == name]
        if not student:
            continue
        if {r["example_id"] for r in student} != set(by_id):
            sys.exit(f"{outputs_path}: {name} and the teacher answered different examples")
        fails = lambda rs: mean(not r["metrics"].get("format_validity", 1.0) for r in rs)  # noqa: E731
        teacher_on = lambda rs: mean(by_id[r["example_id"]]["metrics"]["task_success"] for r in rs)  # noqa: E731
        by_tag = {tag: [r for r in student if tag in (r.get("tags") or [])] for tag in sorted({t for r in student for t in r.get("tags") or []})}
        by_tag["untagged"] = [r for r in student if not r.get("tags")]
        failing = [r for r in student if not r["metrics"].get("format_validity", 1.0)]
        out["first_models"][name] = {
            "task_success": metrics.summary([r["metrics"]["task_success"] for r in student], seed),
            "format_failures": {"share": fails(student), "teacher_task_success_on_them": teacher_on(failing),
                                "by_tag": {tag: {"examples": len(rs), "share": fails(rs), "teacher_task_success": teacher_on(rs)} for tag, rs in by_tag.items()}},
            "signals": {signal: {("with_verifier" if v else "confidence_only"): budget(student, teacher, signal, v, args.max_share, teacher_success["mean"], seed)
                                 for v in (True, False)} for signal in routing.SIGNALS},
        }  # fmt: skip
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
