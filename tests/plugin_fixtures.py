"""A user verifier loaded by import path in the tests (`python` verifier)."""


def mentions_city(example, candidate, city="Paris"):
    return city in candidate["text"], f"no_{city.lower()}"


def quotes_order_id(sample, row):
    """A `python` check of the chat task: the answer quotes the order id the row carries in its metadata."""
    return (row["meta"]["order_id"] in sample["answer"], "order_id_missing")


def share_of_words(sample, row):
    """A graded `python` check: the share of the reference's words the answer uses."""
    want = set(row["reference_message"]["content"].lower().split())
    return len(want & set(sample["answer"].lower().split())) / len(want)
