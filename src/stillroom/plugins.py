"""One plugin mechanism for every extension point; the built-ins use it too.

A plugin is a module exposing ``register(registry)``, advertised under the entry-point group
``stillroom.plugins``. stillroom's own tasks and verifiers live in ``stillroom.builtin_plugins``,
which is registered through the same group in ``pyproject.toml``, so the path a third party takes
is the path the built-ins take every day.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points
from typing import Any

KINDS = ("task", "verifier", "teacher", "metric")  # extension points known today; later stages add theirs here
ENTRY_POINT_GROUP = "stillroom.plugins"


class UnknownPlugin(ValueError):
    """A name that no installed plugin registered (a ValueError, so config validation reports it)."""


class Registry:
    """Name -> object maps, one per kind. Registering the same name twice is an error."""

    def __init__(self) -> None:
        self._items: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, name: str, obj: Any) -> None:
        if kind not in self._items:
            raise ValueError(f"unknown plugin kind {kind!r}; known kinds: {', '.join(KINDS)}")
        if name in self._items[kind]:
            raise ValueError(f"{kind} {name!r} is registered twice")
        self._items[kind][name] = obj

    def get(self, kind: str, name: str) -> Any:
        try:
            return self._items[kind][name]
        except KeyError:
            known = ", ".join(sorted(self._items.get(kind, {}))) or "none"
            raise UnknownPlugin(f"unknown {kind} {name!r}; registered: {known}") from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])


@functools.cache
def registry() -> Registry:
    """The process-wide registry, filled from every installed plugin on first use."""
    reg = Registry()
    loaded = set()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        module = ep.load()
        if module.__name__ in loaded:
            continue
        module.register(reg)
        loaded.add(module.__name__)
    if "stillroom.builtin_plugins" not in loaded:  # running from a source tree without install
        from stillroom import builtin_plugins

        builtin_plugins.register(reg)
    return reg
