"""stillroom's own plugins, registered through the same entry point a third party uses."""

from __future__ import annotations


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
    from stillroom import checks, metrics, verifiers
    from stillroom.chat_task import ChatTask
    from stillroom.examples.toolcall.task import ToolCallTask, no_call, tool_call, trace

    registry.add("teacher", "hf", hf_teacher)
    registry.add("teacher", "openai", openai_teacher)
    registry.add("task", "toolcall", ToolCallTask())
    registry.add("task", "chat", ChatTask())
    for name in ("json_schema", "regex", "length", "python", "refusal", "over_refusal", "reference"):
        registry.add("verifier", name, getattr(verifiers, name))
    registry.add("verifier", "tool_call", tool_call)
    registry.add("verifier", "no_call", no_call)
    registry.add("verifier", "trace", trace)
    registry.add("verifier", "checks", checks.verifier)
    for name in ("task_success", "format_validity", "unsafe_compliance", "over_refusal"):
        registry.add("metric", name, getattr(metrics, name))
    registry.add("metric", "call_validity", checks.call_validity)
