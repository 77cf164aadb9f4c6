"""Progress bars with rate and ETA for every long loop (rich)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def bar(enabled: bool = True) -> Progress:
    """``with bar() as p: t = add(p, "generate", n, "prompts"); advance(p, t)``; ``enabled=False`` draws nothing."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
        disable=not enabled,
    )


def add(progress: Progress, description: str, total: int, unit: str):
    return progress.add_task(description, total=total, rate=f"- {unit}/s", info="", unit=unit)


def advance(progress: Progress, task, n: float = 1, info: str = "") -> None:
    progress.advance(task, n)
    t = next(x for x in progress.tasks if x.id == task)
    speed = t.speed
    progress.update(task, rate=f"{speed:.2f} {t.fields['unit']}/s" if speed else f"- {t.fields['unit']}/s", info=info)
