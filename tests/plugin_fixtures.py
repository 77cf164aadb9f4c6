"""A user verifier loaded by import path in the tests (`python` verifier)."""


def mentions_city(example, candidate, city="Paris"):
    return city in candidate["text"], f"no_{city.lower()}"
