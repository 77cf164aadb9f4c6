"""The Task and Verifier seams, and the Verdict they return.

A task (registered under kind ``task``) makes examples and prompts and judges outputs; a verifier
(kind ``verifier``) is a factory whose parameters come from the config and which returns a plain
function ``verify(example, candidate) -> Verdict`` (``candidate``: ``text`` and, where known,
``token_ids``). Examples are plain dicts (JSON lines) with at least ``id``, ``task``, ``layer``,
``slice`` and ``expected`` (whose ``kind`` says what a right answer is: ``call``, ``no_call``,
``ask``, ``refuse``, ``trace``: several calls, each acting on the last result, then an answer).
A candidate of a multi-step example also carries ``messages``: its assistant and tool turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str  # "ok" or why it failed, for the data card
    score: float = 0.0  # 1.0 / 0.0 unless the check grades


class Task(Protocol):
    name: str

    def build_examples(self, n: int, layer_weights: dict[str, float], seed: int, held_out_functions: int) -> list[dict]:
        """``n`` examples split across layers by weight. Examples that must never be trained on (e.g.
        they use held-out functions) carry ``"pinned_split": "not_train"`` (held out: eval, or eval and dev
        by ``data.not_train_split``), or ``"eval"`` to be evaluated only; those that must never be held out
        (their request text is one a held-out example uses) carry ``"pinned_split": "not_eval"``."""

    def examples_from_config(self, cfg) -> tuple[list[dict], dict]:
        """Optional, instead of ``build_examples``: examples read from what the config names (the
        ``chat`` task's data files), each pinned to its split, and a data card for the manifest."""

    def source_files(self, cfg) -> list[str]:
        """Optional, with ``examples_from_config``: the files read; their hashes are part of prepare's key."""

    def teacher_messages(self, example: dict, context: str) -> list[dict]:
        """Chat messages for the teacher; ``context`` is ``few_shot`` or ``none``."""

    def student_messages(self, example: dict) -> list[dict]:
        """Chat messages for the student: no few-shot context (context distillation)."""

    def check(self, example: dict, output: str | list[dict]) -> Verdict:
        """Task success: does ``output`` do what the example's reference says. ``output`` is the answer
        text, or for a multi-step example the assistant and tool turns after the request."""

    def tool_results(self, example: dict, output: str) -> list[dict] | None:
        """Multi-step examples: the tool turns answering the calls in ``output``, or None when the
        episode ends (single-turn examples: always None)."""

    def fingerprint(self) -> str:
        """Optional: a hash of the prompt context and checking code; when it changes, the stages that prompt
        or judge with the task run again (without it, its class name stands in)."""

    def with_teacher_context(self, messages: list[dict]) -> list[dict]:
        """A served conversation as the teacher sees it (its context added), for cascade escalation."""

    def served_messages(self, conversation: list[dict], tools: list[dict], options: dict) -> list[dict]:
        """Optional: a served OpenAI conversation (turns with ``content`` and, on assistant turns,
        ``tool_calls`` as ``{"name", "arguments"}``) and its offered ``tools`` as the student's messages,
        rendered as ``student_messages`` renders an example. ``options``: ``serving_options(cfg)``."""

    def serving_options(self, cfg) -> dict:
        """Optional: what ``served_messages`` needs from the run's config (the registry records it)."""


def answer_of(candidate: dict) -> str | list[dict]:
    """What a task judges: the answer text, or a multi-step candidate's turns (``messages``)."""
    return candidate.get("messages") or candidate["text"]


class Verifier(Protocol):
    def __call__(self, example: dict, candidate: dict) -> Verdict: ...
