"""The `chat` task: distil any chat or tool-calling traffic given as files, by config alone.

``data.train`` (and optionally ``data.dev`` / ``data.eval``) hold rows in the OpenAI chat format
(``chat_data``); each row gives one example (``data.learn: last``) or one per assistant turn
(``every``: the teacher regenerates each turn in its logged context). The examples carry everything
the stages need, so every stage reads them through the Task protocol like the built-in task's:

- the prompt turns (``messages``, OpenAI format, tool calls included) and the row's ``tools``;
- the reference (``reference_message``, and as the models write it, ``reference``);
- the contexts (``data.context``): the teacher's system prompt and few-shot conversations, the
  student's system prompt; the row's tools are appended to both system prompts;
- the checks (``data.checks``, or the defaults), the judge's teacher resolved to the run's.

Rows from ``data.train`` are split by a hash of the row id (every turn of a conversation lands in the
same split); rows from ``data.dev`` / ``data.eval`` are pinned to those splits.
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

from stillroom import chat_data, checks
from stillroom.chat_data import BadRow, RowError
from stillroom.tasks import Verdict
from stillroom.verifiers import is_refusal

BAD_ROWS_IN_CARD = 20


def files_of(data) -> list[tuple[str, str | None]]:
    """(path, pinned split or None) of each data file."""
    return [(data.train, None), *([(data.dev, "dev")] if data.dev else []), *([(data.eval, "eval")] if data.eval else [])]


def few_shot(path: str | None) -> tuple[list[list[dict]], list[BadRow]]:
    """The few-shot conversations (text turns, each shot's tools named in its first user turn)."""
    if path is None:
        return [], []
    shots, bad = [], []
    for line, raw in chat_data.read_rows(path):
        if isinstance(raw, BadRow):
            bad.append(raw)
            continue
        try:
            row = chat_data.parse_row(raw, {})
        except RowError as e:
            bad.append(BadRow(path, line, e.field, e.what))
            continue
        turns = chat_data.text_messages([m for m in row["messages"] if m["role"] != "system"])
        if row["tools"]:
            first = next(i for i, m in enumerate(turns) if m["role"] == "user")
            names = json.dumps([t["function"] for t in row["tools"]], ensure_ascii=False, sort_keys=True)
            turns[first] = {"role": "user", "content": f"(tools in this conversation: {names})\n{turns[first]['content']}"}
        shots.append(turns)
    return shots, bad


def bad_rows(data) -> list[BadRow]:
    """Every malformed row of the data files and the few-shot file (config validation reads this)."""
    _, bad = chat_data.load(files_of(data), data.fields, data.learn)
    return bad + few_shot(data.context.few_shot)[1]


def expected_of(ref: dict | None) -> dict:
    """What the built-in verifiers and metrics read: calls to make, a refusal, an answer, or open."""
    if ref is None:
        return {"kind": "open"}
    if ref.get("tool_calls"):
        return {"kind": "call", "calls": ref["tool_calls"]}
    return {"kind": "refuse"} if is_refusal(ref.get("content") or "") else {"kind": "answer"}


def examples_from_config(cfg) -> tuple[list[dict], dict]:
    """The examples of the data files with their contexts, checks and pinned splits; the data card
    (rows read, examples per split, bad rows skipped by field)."""
    from stillroom.stages.prepare import split_of

    d = cfg.data
    rows, bad = chat_data.load(files_of(d), d.fields, d.learn)
    shots, shot_problems = few_shot(d.context.few_shot)
    if shot_problems or (bad and d.on_bad_row == "fail"):
        raise ValueError("malformed rows (data.on_bad_row: fail):\n" + "\n".join(map(str, shot_problems + bad)))
    teacher_base = d.context.teacher_system
    if d.context.teacher_system_file:
        teacher_base = Path(d.context.teacher_system_file).read_text()
    specs = [c.spec() for c in d.checks] if d.checks else None
    for s in specs or []:
        if s["kind"] == "judge" and "teacher" not in s:
            s["teacher"] = cfg.teacher.model_dump(mode="json")
    eval_fraction, dev_fraction = (0.0 if d.eval else d.eval_fraction), (0.0 if d.dev else d.dev_fraction)
    examples = []
    for r in rows:
        own_system = next((m["content"] for m in r["messages"] if m["role"] == "system"), None)
        student = d.context.student_system if d.context.student_system is not None else own_system
        teacher = teacher_base if teacher_base is not None else student
        ref = r["reference_message"]
        examples.append({
            "id": r["id"], "task": "chat", "group": r["group"], "source": r["source"], "layer": r["layer"], "slice": r["slice"],
            "meta": r["meta"], "tools": r["tools"], "messages": r["messages"], "reference_message": ref,
            "reference": chat_data.reference_text(ref), "request": chat_data.request_text(r["messages"]), "expected": expected_of(ref),
            "system": {"student": chat_data.system_prompt(student, r["tools"]), "teacher": chat_data.system_prompt(teacher, r["tools"])},
            "few_shot": [m for shot in shots for m in shot], "checks": specs,
            "pinned_split": r["split"] or split_of(r["group"], eval_fraction, dev_fraction),
        })  # fmt: skip
    card = {"rows_with_examples": len({e["group"] for e in examples}), "examples": len(examples), "learn": d.learn,
            "bad_rows_skipped": len(bad), "bad_rows_by_field": dict(sorted(collections.Counter(b.field.split("[")[0] for b in bad).items())),
            "bad_rows": [str(b) for b in bad[:BAD_ROWS_IN_CARD]]}  # fmt: skip
    return examples, card


class ChatTask:
    name = "chat"

    def fingerprint(self) -> str:
        """The code that prompts and judges (contexts and checks travel with the examples)."""
        code = b"".join(Path(m.__file__).read_bytes() for m in (chat_data, checks)) + Path(__file__).read_bytes()
        return hashlib.sha256(code).hexdigest()[:16]

    def build_examples(self, n, layer_weights, seed, held_out_functions) -> list[dict]:
        raise RuntimeError("data.task: chat reads its rows from files (examples_from_config), it generates none")

    def examples_from_config(self, cfg) -> tuple[list[dict], dict]:
        return examples_from_config(cfg)

    def source_files(self, cfg) -> list[str]:
        """The files the examples are read from: the data, the few-shot conversations, the teacher's system prompt."""
        c = cfg.data.context
        return [path for path, _ in files_of(cfg.data)] + [f for f in (c.few_shot, c.teacher_system_file) if f]

    @staticmethod
    def _conversation(example: dict) -> list[dict]:
        return chat_data.text_messages([m for m in example["messages"] if m["role"] != "system"])

    def student_messages(self, example: dict) -> list[dict]:
        system = example["system"]["student"]
        return ([{"role": "system", "content": system}] if system else []) + self._conversation(example)

    def teacher_messages(self, example: dict, context: str = "few_shot") -> list[dict]:
        if context == "none":
            return self.student_messages(example)
        system = example["system"]["teacher"]
        return ([{"role": "system", "content": system}] if system else []) + example["few_shot"] + self._conversation(example)

    def serving_options(self, cfg) -> dict:
        """What a served request's rendering needs from the run (recorded in the registry version)."""
        return {"student_system": cfg.data.context.student_system}

    def served_messages(self, conversation: list[dict], tools: list[dict], options: dict) -> list[dict]:
        """A served OpenAI conversation (``chat_wire``) as ``student_messages`` renders a row: the run's
        student system prompt (or, where the run kept each row's own, the client's), the offered tools
        appended to it, calls as ``<tool_call>`` blocks, results as ``<tool_response>`` turns."""
        own = next((m["content"] for m in conversation if m["role"] == "system"), None)
        base = options.get("student_system") if options.get("student_system") is not None else own
        system = chat_data.system_prompt(base, tools)
        return ([{"role": "system", "content": system}] if system else []) + chat_data.text_messages(
            [m for m in conversation if m["role"] != "system"])

    def with_teacher_context(self, messages: list[dict]) -> list[dict]:
        """A served conversation goes to the teacher as it is: the contexts are per run, not per request."""
        return messages

    def tool_results(self, example: dict, output: str) -> list[dict] | None:
        """Logged conversations carry their tool results; each learned turn is one generation."""
        return None

    def check(self, example: dict, output: str | list[dict]) -> Verdict:
        text = output if isinstance(output, str) else "\n".join(m["content"] for m in output if m["role"] == "assistant")
        return checks.run_all(example, text)
