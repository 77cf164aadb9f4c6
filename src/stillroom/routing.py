"""The cascade: the student answers first; the teacher answers instead when the student's confidence is
below a threshold, or (optionally) when the student's answer fails the format verifiers.

The threshold is fitted on the dev split: among all thresholds, the one that reaches the target task
success (the teacher's on dev, or a set share) with the smallest teacher share; with a teacher budget
(``route.max_teacher_share``), among the thresholds within it, the best task success where none
reaches the target. It is then applied,
unchanged, to the held-out split. Both models decode greedily, so a cascade's answer to an example
is exactly the answer of the model it routes to; the figures come from the two models' recorded answers.
"""

from __future__ import annotations

import math

from stillroom import metrics

SIGNALS = {"mean_token_prob": "mean_logprob", "min_token_prob": "min_logprob", "seq_prob": "seq_logprob"}


def logprob_stats(token_logprobs: list[float] | None) -> dict[str, float]:
    """The statistics a confidence signal reads, from the log-probs of the emitted tokens."""
    lps = token_logprobs or [0.0]
    return {"mean_logprob": sum(lps) / len(lps), "min_logprob": min(lps), "seq_logprob": sum(lps)}


def confidence(row: dict, signal: str) -> float:
    """``row``: anything carrying ``logprob_stats``' keys (an eval row, or the stats themselves)."""
    return math.exp(row[SIGNALS[signal]])


def escalates(row: dict, threshold: float, signal: str, verifier: bool) -> bool:
    return confidence(row, signal) < threshold or (verifier and not row["metrics"].get("format_validity", 1.0))


def outcome(student: list[dict], teacher: list[dict], threshold: float, signal: str, verifier: bool) -> tuple[list[float], float]:
    """Per example the cascade's task success (same order as ``student``), and the teacher's share."""
    by_id = {r["example_id"]: r for r in teacher}
    success, escalated = [], 0
    for r in student:
        up = escalates(r, threshold, signal, verifier)
        escalated += up
        success.append((by_id[r["example_id"]] if up else r)["metrics"]["task_success"])
    return success, escalated / max(len(student), 1)


def curve(student: list[dict], teacher: list[dict], signal: str, verifier: bool) -> list[dict]:
    """Task success and teacher share at every threshold that changes a routing decision, from
    0 (the teacher answers only what the verifier rejects) to above 1 (the teacher answers everything)."""
    thresholds = [0.0, *sorted({confidence(r, signal) for r in student} - {0.0}), 1.0 + 1e-9]
    points = []
    for t in thresholds:
        success, share = outcome(student, teacher, t, signal, verifier)
        points.append({"threshold": t, "teacher_share": round(share, 4), "task_success": round(sum(success) / max(len(success), 1), 4)})
    return points


def choose(points: list[dict], target: float, max_share: float | None = None) -> tuple[dict, bool]:
    """The point with the smallest teacher share that reaches ``target``; else the best task success.
    With a teacher budget ``max_share`` only the points within it compete (none within: the one with
    the smallest share)."""
    if max_share is not None:
        within = [p for p in points if p["teacher_share"] <= max_share + 1e-12]
        points = within or [min(points, key=lambda p: (p["teacher_share"], p["threshold"]))]
    reaching = [p for p in points if p["task_success"] >= target - 1e-12]
    if reaching:
        return min(reaching, key=lambda p: (p["teacher_share"], p["threshold"])), True
    return max(points, key=lambda p: (p["task_success"], -p["teacher_share"])), False


def fit_and_evaluate(dev_rows: dict[str, list[dict]], eval_rows: dict[str, list[dict]], route, seed: int) -> dict:
    """Fit on dev (the threshold, and with ``route.verifier: auto`` whether failing the format verifiers
    escalates too: the cheaper policy that reaches the target, the verifier kept on a tie), then apply
    it unchanged to the held-out rows. With ``route.max_teacher_share`` a policy within that budget on
    dev wins over one outside it, whatever their task success."""
    s_dev, t_dev = dev_rows["student"], dev_rows["teacher"]
    teacher_dev = sum(r["metrics"]["task_success"] for r in t_dev) / max(len(t_dev), 1)
    target = teacher_dev if route.target == "teacher" else float(route.target)
    budget = route.max_teacher_share
    fits = []
    for verifier in ([True, False] if route.verifier == "auto" else [route.verifier]):
        dev_curve = curve(s_dev, t_dev, route.signal, verifier)
        chosen, reached = choose(dev_curve, target, budget)
        within = budget is None or chosen["teacher_share"] <= budget + 1e-12
        rank = (not within, not reached, chosen["teacher_share"] if reached else -chosen["task_success"], not verifier)
        fits.append((rank, verifier, dev_curve, chosen, reached))
    (over, *_), verifier, dev_curve, chosen, reached = min(fits, key=lambda f: f[0])
    success, share = outcome(eval_rows["student"], eval_rows["teacher"], chosen["threshold"], route.signal, verifier)
    return {
        "signal": route.signal, "verifier": verifier, "verifier_setting": route.verifier, "threshold": chosen["threshold"],
        "target": round(target, 4), "target_reached_on_dev": reached, "dev_examples": len(s_dev),
        "dev": {"task_success": chosen["task_success"], "teacher_share": chosen["teacher_share"]},
        "eval": {"task_success": metrics.summary(success, seed), "teacher_share": round(share, 4)},
        "dev_curve": dev_curve, "eval_curve": curve(eval_rows["student"], eval_rows["teacher"], route.signal, verifier),
        **({"max_teacher_share": budget, "within_budget_on_dev": not over} if budget is not None else {}),
    }  # fmt: skip
