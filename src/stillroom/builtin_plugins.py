"""stillroom's own plugins, registered through the same entry point a third party uses."""

from __future__ import annotations

from stillroom.tasks import Verdict


def verify_reference(example: dict, output: str) -> Verdict:
    """Matches the example's known reference, judged by the example's own task."""
    from stillroom.plugins import registry

    return registry().get("task", example["task"]).check(example, output)


def register(registry) -> None:
    from stillroom.examples.toolcall.task import ToolCallTask, verify_tool_call

    registry.add("task", "toolcall", ToolCallTask())
    registry.add("verifier", "tool_call", verify_tool_call)
    registry.add("verifier", "reference", verify_reference)
