"""Requests per second of every model a finished run evaluated, against the corrected teacher's.

    python benchmarks/served_speed.py --run runs/demo [--base teacher]

The eval stage times one batched pass over the held-out split per model and records tokens/s and
requests/s. Tokens/s is not what a deployment buys: a model that writes longer answers decodes more
tokens per request. This reads the run's ``eval/results.json`` (requests/s and the pass's seconds, tokens/s,
p50 latency) and ``eval/outputs.jsonl`` (each answer's new tokens; a multi-step task counts as one request,
all its turns' tokens included) and prints one JSON object: per model, requests/s = answers / seconds,
mean new tokens per answer, and the ratios to ``--base`` on requests/s, tokens/s and p50 latency
(> 1: faster than the base). Nothing is re-run. A run from before the eval stage recorded requests/s
(stage version < 0.5.0) has its seconds recovered as new tokens / tokens/s. Models evaluated on a subset (the teacher as shipped,
``eval.shipped_teacher_examples``) are timed on that subset only, which ``examples`` says.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path


def speeds(results: dict, outputs: list[dict]) -> dict[str, dict]:
    """Per model: answers, new tokens, the pass's seconds, requests/s, tokens/s, p50 latency (ms)."""
    answers, tokens = collections.Counter(), collections.Counter()
    for r in outputs:
        answers[r["model"]] += 1
        tokens[r["model"]] += r["new_tokens"]
    out = {}
    for label, m in results["models"].items():
        if not answers[label] or not m.get("tokens_per_s"):
            continue
        seconds = m.get("batch_seconds") or tokens[label] / m["tokens_per_s"]
        out[label] = {
            "examples": answers[label],
            "mean_new_tokens": round(tokens[label] / answers[label], 2),
            "pass_s": round(seconds, 1),
            "requests_per_s": m.get("requests_per_s") or round(answers[label] / seconds, 4),
            "tokens_per_s": m["tokens_per_s"],
            "latency_p50_ms": m["latency_p50_ms"],
        }
    return out


def with_ratios(table: dict[str, dict], base: str) -> dict[str, dict]:
    """Each model's row with its speed over ``base``'s: requests/s, tokens/s, and p50 latency (base's over the model's)."""
    b = table[base]
    return {label: {**row, "requests_per_s_ratio": round(row["requests_per_s"] / b["requests_per_s"], 3),
                    "tokens_per_s_ratio": round(row["tokens_per_s"] / b["tokens_per_s"], 3),
                    "latency_p50_ratio": round(b["latency_p50_ms"] / row["latency_p50_ms"], 3)}
            for label, row in table.items()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (its eval stage done)")
    ap.add_argument("--base", default="teacher", help="the model the ratios are taken against (eval's label)")
    args = ap.parse_args()

    from stillroom import atomic

    results_path = args.run / "eval" / "results.json"
    if not results_path.exists():
        sys.exit(f"{results_path}: not found; run the eval stage first")
    table = speeds(json.loads(results_path.read_text()), atomic.read_jsonl(args.run / "eval" / "outputs.jsonl"))
    if args.base not in table:
        sys.exit(f"{args.run}: no model {args.base!r} in eval (have {sorted(table)})")
    print(json.dumps({"run": str(args.run), "base": args.base, "models": with_ratios(table, args.base)}, indent=1))


if __name__ == "__main__":
    main()
