"""Episodes against a task's tools: generate, run the calls, feed the results back, until an answer.

One path for every example: a single-turn example ends after its first turn (the task returns no tool
results for it); a multi-step example goes on while the model makes calls, up to ``max_steps``
assistant turns. Conversations still running are batched together each round, so a batch of mixed
examples costs one generation call per round. Used by the teacher's signal generation, self-generation
by the student, and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from stillroom.generation import Generated

Complete = Callable[[list[int], list[list[dict]], int], list[Generated]]  # (example indices, conversations, step) -> one turn each


@dataclass
class Episode:
    turns: list[Generated]  # the model's turns, in order
    messages: list[dict]  # what followed the prompt: assistant and tool turns

    @property
    def multi_turn(self) -> bool:
        return len(self.messages) > 1

    def combined(self) -> Generated:
        """The episode as one ``Generated``: the first turn itself when there was one turn; otherwise the
        assistant texts joined by newlines, tokens and token log-probs concatenated, no top-k (a trace's
        positions are not one sequence the store could align)."""
        if len(self.turns) == 1:
            return self.turns[0]
        logprobs = None
        if all(t.token_logprobs is not None for t in self.turns):
            logprobs = [lp for t in self.turns for lp in t.token_logprobs]
        return Generated(
            text="\n".join(t.text for t in self.turns),
            token_ids=[i for t in self.turns for i in t.token_ids],
            prompt_tokens=self.turns[0].prompt_tokens,
            finished=self.turns[-1].finished,
            token_logprobs=logprobs,
        )


def sample(endpoint, task, examples: list[dict], messages_of, sampling, seed_of, top_k: int, max_steps: int,
           constraint_of=None) -> list[Episode]:  # fmt: skip
    """Episodes of ``examples`` through a teacher endpoint (``complete``); ``seed_of(example, step)``
    seeds each turn; ``constraint_of(example)`` (``constrained``, or None) holds each turn to a format."""

    def turn(indices, convs, step):
        seeds = [seed_of(examples[i], step) for i in indices]
        if constraint_of is None:
            return endpoint.complete(convs, sampling, seeds, top_k)
        return endpoint.complete(convs, sampling, seeds, top_k, constraints=[constraint_of(examples[i]) for i in indices])

    return run(turn, task, examples, [messages_of(e) for e in examples], max_steps)


def run(complete: Complete, task, examples: list[dict], conversations: list[list[dict]], max_steps: int) -> list[Episode]:
    """One episode per example, starting from its conversation (the prompt messages)."""
    convs = [list(c) for c in conversations]
    episodes = [Episode([], []) for _ in examples]
    active = list(range(len(examples)))
    for step in range(max_steps):
        if not active:
            break
        outputs = complete(active, [convs[i] for i in active], step)
        still = []
        for i, g in zip(active, outputs):
            episodes[i].turns.append(g)
            said = {"role": "assistant", "content": g.text}
            episodes[i].messages.append(said)
            results = task.tool_results(examples[i], g.text) if step + 1 < max_steps else None
            if results:
                episodes[i].messages += results
                convs[i] += [said, *results]
                still.append(i)
        active = still
    return episodes
