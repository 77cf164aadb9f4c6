"""`stillroom init DATA_FILE`: look at a file of chat rows and write a starter config that validates.

What it reads (``chat_data.inspect``): rows, columns, tools, references, tool calls, multi-turn rows,
layers, slices and malformed rows. What it writes: a `chat` run on that file with the settings those
facts call for (every assistant turn learned when rows have several; bad rows skipped, and counted,
when there are some; layer weights over the layers present), each line commented.
"""

from __future__ import annotations

import os
from pathlib import Path

from stillroom import chat_data


def _yaml_str(value: str) -> str:
    import json

    return json.dumps(value)  # a JSON string is a valid YAML scalar


DEFAULT_TEACHER_LAYERS = 30  # SmolLM2-135M-Instruct


def teacher_layers(teacher: str) -> int:
    """Decoder layers of the teacher (``default``, or a folder's config.json), read without loading it."""
    import json

    if teacher == "default":
        return DEFAULT_TEACHER_LAYERS
    config = Path(teacher) / "config.json"
    if not config.exists():
        raise ValueError(f"teacher {teacher!r}: not `default` and not a model folder with a config.json")
    return int(json.loads(config.read_text()).get("num_hidden_layers", 1))


def starter(data_file: Path, out: Path, teacher: str = "default", facts: dict | None = None) -> str:
    """The starter config's YAML text for ``data_file``, written to be read from ``out``'s folder."""
    facts = facts or chat_data.inspect(data_file)
    rel = os.path.relpath(data_file.resolve(), out.resolve().parent)
    layers = facts["layers"] or ["core"]
    weights = ", ".join(f"{layer}: {round(1 / len(layers), 3)}" for layer in layers)
    learn = "every" if facts["multi_turn"] else "last"
    bad = len(facts["bad_rows"])
    keep = max(1, round(teacher_layers(teacher) * 2 / 3))  # a third of the depth pruned: heals within a few epochs
    if teacher != "default":
        teacher = str(Path(teacher).resolve())
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in data_file.stem) or "chat"
    lines = [
        f"# Starter config written by `stillroom init {data_file.name}`:",
        f"# {facts['rows']} rows ({bad} malformed), {facts['with_tools']} with tools, {facts['with_reference']} with a reference,",
        f"# {facts['with_tool_calls']} with tool calls, {facts['multi_turn']} with several assistant turns; slices: {', '.join(facts['slices']) or '-'}.",
        "# Check it with `stillroom validate` and run it with `stillroom run`.",
        "run:",
        f"  name: {name}  # the run folder: runs/{name}",
        "teacher:",
        f"  model: {_yaml_str(teacher)}  # `default` (SmolLM2-135M-Instruct), a local model folder, or backend: openai with url",
        "student:",
        "  pruned_from: teacher  # the teacher's own layers, fewer of them",
        f"  keep_layers: {keep}  # of the teacher's {teacher_layers(teacher)} layers",
        "  prune_by: importance",
        "data:",
        "  task: chat",
        f"  train: {_yaml_str(rel)}  # split by a hash of each row id into train / dev / eval",
        "  eval_fraction: 0.2",
        "  dev_fraction: 0.1",
        f"  learn: {learn}  # {'rows have several assistant turns: learn each in its logged context' if learn == 'every' else 'the last assistant turn of each row'}",
        f"  on_bad_row: {'skip' if bad else 'fail'}  # {f'{bad} malformed rows are dropped and counted' if bad else 'a malformed row stops the run before any model loads'}",
        f"  layer_weights: {{{weights}}}  # the training mixture's share of each layer",
        "  context:",
        "    teacher_system: null  # the teacher's system prompt (default: the student's)",
        "    few_shot: null  # a JSONL file of worked conversations shown to the teacher",
        "    student_system: null  # the student's system prompt (default: each row's own system turn)",
        "  checks: null  # null: reference match where a row has a reference, schema-valid tool calls where it has tools",
        "  mixture:",
        "    sources: [teacher, reference]  # selected teacher answers and the rows' own references",
        "signals:",
        "  n: 2  # teacher candidates per prompt",
        "  max_new_tokens: 96",
        "train:",
        "  epochs: 2",
        "  max_length: 768",
        "  reference_weight: 1.0",
        "eval:",
        "  max_new_tokens: 96",
        "  latency_requests: 8",
    ]
    return "\n".join(lines) + "\n"
