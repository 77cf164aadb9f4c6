"""Argument values for the example's requests: each catalog pool widened by the kind of its values.

The catalog gives four or five values per argument. Drawn from those alone, the same request recurs
across splits (the contamination check then drops most training copies of the multi-step and short
templates), and a model can score by recalling a value it saw rather than copying the one asked for.
Here a pool of dates becomes any date in 2025-2026, times any quarter hour, integers any multiple of
the pool's common step between its least and greatest value, decimals any amount in the pool's range,
cities and people's names draw from banks of 40+ and 30x30. Enums and free-text pools (titles,
messages) stay as written. Every draw comes from the caller's ``random.Random``: an example is still
a pure function of (seed, layer, index).
"""

from __future__ import annotations

import datetime
import math
import random
import re

CITIES = [
    "Paris", "Tokyo", "Denver", "Lagos", "Melbourne", "Toronto", "Lisbon", "Chicago", "Kyoto", "Barcelona", "Austin", "Seattle",
    "Dublin", "Sydney", "Boston", "Berlin", "Portland", "Raleigh", "Phoenix", "Madrid", "Oslo", "Rome", "Seoul", "Nairobi", "Lima",
    "Vienna", "Prague", "Helsinki", "Cairo", "Mumbai", "Bangkok", "Manila", "Auckland", "Vancouver", "Montreal", "Atlanta", "Miami",
    "Houston", "Stockholm", "Warsaw", "Athens", "Istanbul", "Santiago", "Bogota", "Marseille", "Glasgow", "Edinburgh", "Osaka",
]  # fmt: skip
FIRST_NAMES = [
    "Ana", "Tom", "Yuki", "Omar", "Lena", "Priya", "Jonas", "Mia", "Kofi", "Sarah", "David", "Laura", "Emily", "Marcus", "John",
    "Grace", "Ivan", "Chloe", "Mateo", "Aisha", "Noah", "Hannah", "Ravi", "Sofia", "Daniel", "Elena", "Felix", "Nora", "Leo", "Zara",
]  # fmt: skip
LAST_NAMES = [
    "Lima", "Becker", "Sato", "Haddad", "Fischer", "Nair", "Berg", "Rossi", "Mensah", "Johnson", "Kim", "Garcia", "Chen", "Brown",
    "Carter", "Patel", "Novak", "Dubois", "Silva", "Khan", "Walsh", "Okafor", "Larsen", "Moreau", "Tanaka", "Costa", "Weber",
    "Murphy", "Ali", "Hughes",
]  # fmt: skip
CITY_PARAMS = {"city"}
PERSON_PARAMS = {"patient_name", "name"}

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_TIME = re.compile(r"\d{2}:\d{2}")


def person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def draw(rng: random.Random, param: str, pool: list, schema: dict) -> object:
    """One value for ``param``, from its catalog ``pool`` widened by the values' kind (see the module)."""
    if "enum" in schema:
        return rng.choice(pool)
    if param in CITY_PARAMS and all(isinstance(v, str) for v in pool):
        return rng.choice(sorted(set(pool) | set(CITIES)))
    if param in PERSON_PARAMS and all(isinstance(v, str) and len(v.split()) == 2 for v in pool):
        return rng.choice(pool) if rng.random() < 0.1 else person(rng)
    if all(isinstance(v, str) and _DATE.fullmatch(v) for v in pool):
        day = datetime.date(2025, 1, 1) + datetime.timedelta(days=rng.randrange(730))
        return day.isoformat()
    if all(isinstance(v, str) and _TIME.fullmatch(v) for v in pool):
        return f"{rng.randrange(6, 23):02d}:{rng.choice((0, 15, 30, 45)):02d}"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in pool):
        step = math.gcd(*pool) or 1
        lo, hi = min(pool), max(pool)
        return lo + step * rng.randrange((hi - lo) // step + 1)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pool):
        lo, hi = min(pool), max(pool)
        decimals = rng.choice((0, 1, 2))
        value = round(rng.uniform(lo, hi), decimals)
        return int(value) if decimals == 0 else value
    return rng.choice(pool)
