"""Task success measured the way a user meets the model: the official ``openai`` client against a running
``stillroom serve``, the tools sent as OpenAI ``tools`` and read back from ``message.tool_calls``.

Each example is played out as the eval stage plays it (``rollout``): greedy turns, and for a multi-step
example the task's tools answering each call, sent back as ``tool`` turns with their ``tool_call_id``,
until the model answers without a call or ``max_steps`` turns. The answer text is rebuilt from the
response (``chat_wire.as_text``: content, then one ``<tool_call>`` block per call) and judged by the
task's own check, so the figures compare with the eval stage's on the same examples.
"""

from __future__ import annotations

import json

from stillroom.chat_wire import RESULT, as_text


def openai_conversation(example: dict) -> list[dict]:
    """The example's prompt turns in OpenAI's wire format (without the student's system prompt, which
    the server adds): the toolcall task's request, or a chat row's turns with call ids made up in order."""
    if "messages" not in example:
        return [{"role": "user", "content": example["request"]}]
    out, pending = [], []
    for k, m in enumerate(example["messages"]):
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [{"id": f"call_{k}_{j}", "type": "function",
                      "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                     for j, c in enumerate(m["tool_calls"])]  # fmt: skip
            pending = [c["id"] for c in calls]
            out.append({"role": "assistant", "content": m.get("content"), "tool_calls": calls})
        elif m["role"] == "tool":
            out.append({"role": "tool", "content": m["content"], **({"tool_call_id": pending.pop(0)} if pending else {})})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def _unwrapped(content: str) -> str:
    return content.removeprefix(RESULT[0]).removesuffix(RESULT[1])


def play(client, model: str, task, example: dict, max_tokens: int, max_steps: int, **extra) -> dict:
    """One example through the client: its turns, the answer text (what the eval stage's ``output``
    holds), the task's verdict, and how many responses carried ``tool_calls``. ``extra``: more request
    fields (``tool_choice``, ...)."""
    messages, turns, texts, with_calls = openai_conversation(example), [], [], 0
    tools = example.get("tools") or []
    for step in range(max_steps):
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                           **({"tools": tools} if tools else {}), **extra)  # fmt: skip
        message = r.choices[0].message.model_dump(exclude_none=True)
        with_calls += bool(message.get("tool_calls"))
        text = as_text(message)
        texts.append(text)
        turns.append({"role": "assistant", "content": text})
        results = task.tool_results(example, text) if step + 1 < max_steps else None
        if not results:
            break
        turns += results
        messages.append({"role": "assistant", "content": message.get("content"), "tool_calls": message.get("tool_calls", [])})
        ids = [c["id"] for c in message.get("tool_calls", [])]
        messages += [{"role": "tool", "content": _unwrapped(t["content"]), **({"tool_call_id": ids[i]} if i < len(ids) else {})}
                     for i, t in enumerate(results)]  # fmt: skip
    verdict = task.check(example, turns if len(turns) > 1 else texts[0])
    return {"example_id": example["id"], "output": "\n".join(texts), "passed": verdict.passed, "reason": verdict.reason,
            "responses_with_tool_calls": with_calls, "turns": len(texts)}  # fmt: skip
