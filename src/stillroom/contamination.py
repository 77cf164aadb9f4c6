"""Contamination check: does training text contain evaluation text?

For every evaluation text we index its word n-grams; a training text is contaminated by an
evaluation text when it contains at least ``threshold`` of that text's n-grams, each n-gram weighted
by its inverse document frequency over both sets. Containment finds an evaluation prompt pasted
inside a longer training text; light edits (case, punctuation, added or dropped words) leave most of
the weight intact; the IDF weights keep texts that only share a template ("Set a timer for 5
minutes" / "... for 25 minutes") apart, since template n-grams are common and the values are not.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from stillroom.textnorm import word_ngrams


@dataclass(frozen=True)
class Hit:
    train_id: str
    eval_id: str
    field: str  # "prompt" or "target"
    containment: float  # share of the eval text's n-grams found in the training text


def find(train: list[tuple[str, str]], evals: list[tuple[str, str]], *, field: str, n: int = 3, threshold: float = 0.5) -> list[Hit]:
    """``train`` and ``evals`` are (id, text) pairs; returns the best hit per contaminated train id."""
    train_grams = [word_ngrams(text, n) for _, text in train]
    eval_grams = [word_ngrams(text, n) for _, text in evals]
    df = collections.Counter(g for grams in train_grams + eval_grams for g in grams)
    docs = len(train_grams) + len(eval_grams)
    idf = {g: math.log(docs / c) + 1e-3 for g, c in df.items()}
    index: dict[tuple, set[int]] = collections.defaultdict(set)
    totals = []
    for j, grams in enumerate(eval_grams):
        totals.append(sum(idf[g] for g in grams))
        for g in grams:
            index[g].add(j)
    hits = []
    for (train_id, _), grams in zip(train, train_grams):
        shared: dict[int, float] = collections.defaultdict(float)
        for g in grams:
            for j in index.get(g, ()):
                shared[j] += idf[g]
        best = max(((w / totals[j], -j) for j, w in shared.items() if totals[j] > 0), default=None)
        if best and best[0] >= threshold:
            hits.append(Hit(train_id, evals[-best[1]][0], field, round(best[0], 4)))
    return hits
