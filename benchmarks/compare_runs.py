"""Two finished runs, one model each, on the same held-out examples: paired differences of every metric.

    python benchmarks/compare_runs.py --base runs/old --other runs/demo [--model student] [--other-model M]

A recipe change (another student shape, another signal kind, a bigger labelled pool) is a second run;
its eval stage answers the same held-out examples when the data settings match. This reads both runs'
``eval/outputs.jsonl`` (one verdict per model and example, as the eval stage stored them; nothing is
re-run), checks that the two held-out splits are the same examples (the hashes both runs' ``prepare``
recorded), and prints one JSON object: for each metric, overall, per layer and per tag (``unseen_function``,
``unseen_request``), ``other - base`` with its 95% paired bootstrap interval (``metrics.deltas``), and
the multi-step completions of each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows_of(run: Path, model: str) -> list[dict]:
    from stillroom import atomic

    rows = [r for r in atomic.read_jsonl(run / "eval" / "outputs.jsonl") if r["model"] == model]
    if not rows:
        sys.exit(f"{run}: eval/outputs.jsonl has no answers of model {model!r}")
    return rows


def held_out_hash(run: Path) -> str:
    """The hash ``prepare`` recorded in its manifest for the split the run's eval read."""
    from stillroom.config import load_config
    from stillroom.stages.prepare import split_hash

    return split_hash(run / "prepare", load_config(run / "config.yaml", []).eval.split)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="finished run: the reference")
    ap.add_argument("--other", type=Path, required=True, help="finished run: the change")
    ap.add_argument("--model", default="student", help="model label in eval/outputs.jsonl (student, teacher, pool_only, student_int8, ...)")
    ap.add_argument("--other-model", default=None, help="the other run's model label, when it differs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from stillroom import metrics

    if held_out_hash(args.base) != held_out_hash(args.other):
        sys.exit(f"{args.base} and {args.other} hold out different examples: their answers are not paired")
    other_model = args.other_model or args.model
    base, other = rows_of(args.base, args.model), rows_of(args.other, other_model)
    names = sorted({m for r in base for m, v in r["metrics"].items() if v is not None})
    multi = lambda rows: int(sum(r["metrics"]["task_success"] for r in rows if r["slice"] == "multi_step"))  # noqa: E731
    out = {
        "base": {"run": str(args.base), "model": args.model, "examples": len(base), "multi_step_completed": multi(base)},
        "other": {"run": str(args.other), "model": other_model, "examples": len(other), "multi_step_completed": multi(other)},
        "multi_step_examples": sum(r["slice"] == "multi_step" for r in base),
        "all": metrics.deltas(base, other, names, None, args.seed)["all"],
        "per_layer": metrics.deltas(base, other, names, "layer", args.seed),
        "per_tag": metrics.deltas_by_tag(base, other, names, args.seed),
    }
    for side, rows in (("base", base), ("other", other)):
        out[side].update({m: s["mean"] for m, s in metrics.by_group(rows, names, None, args.seed)["all"].items()})
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
