"""stillroom's own plugins, registered through the same entry point a third party uses."""

from __future__ import annotations

from stillroom.tasks import Verdict


def verify_reference(example: dict, output: str) -> Verdict:
    """Matches the example's known reference, judged by the example's own task."""
    from stillroom.plugins import registry

    return registry().get("task", example["task"]).check(example, output)


def hf_teacher(cfg):
    """A local transformers model (``default`` or a folder)."""
    from stillroom.teachers import HFTeacher

    return HFTeacher.load(cfg.model, cfg.dtype)


def openai_teacher(cfg):
    """Any OpenAI-compatible chat-completions endpoint."""
    import os

    from stillroom.teachers import OpenAITeacher

    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return OpenAITeacher(cfg.url, cfg.model, api_key=key, concurrency=cfg.concurrency,
                         timeout_s=cfg.timeout_s, max_retries=cfg.max_retries)  # fmt: skip


def register(registry) -> None:
    from stillroom.examples.toolcall.task import ToolCallTask, verify_tool_call

    registry.add("teacher", "hf", hf_teacher)
    registry.add("teacher", "openai", openai_teacher)
    registry.add("task", "toolcall", ToolCallTask())
    registry.add("verifier", "tool_call", verify_tool_call)
    registry.add("verifier", "reference", verify_reference)
