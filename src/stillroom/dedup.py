"""Exact and near-duplicate removal. Near duplicates: MinHash LSH (datasketch) over character
5-gram shingles of the normalized text; the first occurrence in input order is kept."""

from __future__ import annotations

import hashlib

from stillroom.textnorm import char_shingles, normalize

NUM_PERM = 128  # MinHash permutations: estimate error ~ 1/sqrt(128) ~ 0.09


def exact_duplicates(items: list[tuple[str, str]]) -> dict[str, str]:
    """(id, text) pairs -> {duplicate id: id of the first item with the same normalized text}."""
    first: dict[str, str] = {}
    dups = {}
    for item_id, text in items:
        key = hashlib.sha256(normalize(text).encode()).hexdigest()
        if key in first:
            dups[item_id] = first[key]
        else:
            first[key] = item_id
    return dups


def near_duplicates(items: list[tuple[str, str]], threshold: float = 0.9) -> dict[str, str]:
    """(id, text) pairs -> {duplicate id: id of an earlier item with estimated Jaccard >= threshold}."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    order, dups = {}, {}
    for i, (item_id, text) in enumerate(items):
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode() for s in sorted(char_shingles(text))])
        hits = lsh.query(m)
        if hits:
            dups[item_id] = min(hits, key=order.__getitem__)
        else:
            lsh.insert(item_id, m)
            order[item_id] = i
    return dups
