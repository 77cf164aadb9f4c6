"""Calibration of a model's confidence against its correctness: ECE with fixed bins, Brier score,
the reliability table behind the diagram, and a temperature fitted on a dev split.

Confidence is a probability per example (stillroom uses the mean token probability of the answer,
exp(mean log p), or the whole sequence's probability); correctness is 0 / 1.
"""

from __future__ import annotations

import math


def reliability(confidence: list[float], correct: list[float], bins: int = 10) -> list[dict]:
    """Equal-width bins over [0, 1] (the last one closed): count, mean confidence and accuracy per bin."""
    table = [{"lo": b / bins, "hi": (b + 1) / bins, "n": 0, "confidence": None, "accuracy": None} for b in range(bins)]
    sums = [[0.0, 0.0] for _ in range(bins)]
    for c, y in zip(confidence, correct):
        b = min(int(c * bins), bins - 1)
        table[b]["n"] += 1
        sums[b][0] += c
        sums[b][1] += y
    for row, (sc, sy) in zip(table, sums):
        if row["n"]:
            row["confidence"], row["accuracy"] = sc / row["n"], sy / row["n"]
    return table


def ece(confidence: list[float], correct: list[float], bins: int = 10) -> float:
    """Expected calibration error: sum over bins of (bin count / N) * |accuracy - mean confidence|."""
    n = len(confidence)
    if n == 0:
        return float("nan")
    return sum(r["n"] / n * abs(r["accuracy"] - r["confidence"]) for r in reliability(confidence, correct, bins) if r["n"])


def brier(confidence: list[float], correct: list[float]) -> float:
    """Mean squared difference between confidence and the 0 / 1 outcome."""
    return sum((c - y) ** 2 for c, y in zip(confidence, correct)) / len(confidence) if confidence else float("nan")


def scaled(mean_logprob: list[float], temperature: float) -> list[float]:
    """Confidence exp(mean log p / T): T > 1 softens (less confident), T < 1 sharpens."""
    return [math.exp(lp / temperature) for lp in mean_logprob]


def fit_temperature(mean_logprob: list[float], correct: list[float]) -> float:
    """The T minimizing the binary log-loss of exp(mean log p / T) against correctness, by a log-spaced
    grid over [0.05, 20] refined once around the best point."""

    def nll(t: float) -> float:
        eps = 1e-9
        return -sum(y * math.log(max(c, eps)) + (1 - y) * math.log(max(1 - c, eps)) for c, y in zip(scaled(mean_logprob, t), correct))

    grid = [0.05 * (400 ** (i / 200)) for i in range(201)]
    best = min(grid, key=nll)
    fine = [best * (1.06 ** (i / 10 - 1)) for i in range(21)]
    return min(fine, key=nll)
