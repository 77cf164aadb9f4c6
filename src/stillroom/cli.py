"""The `stillroom` command line (typer + rich). Every command documents itself with --help."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from stillroom.config import ConfigError, PipelineConfig, load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from local folders; never reach for a hub

app = typer.Typer(add_completion=False, no_args_is_help=True, help="stillroom: distil a teacher into a student, prove it, ship it.")
err = Console(stderr=True)
DEMO_CONFIG = Path(__file__).parent / "examples" / "toolcall" / "demo.yaml"

ConfigArg = typer.Argument(..., exists=False, help="Pipeline config (YAML).")
OverridesArg = typer.Argument(None, help="Dotted overrides, e.g. train.epochs=2 run.name=try2.")
ForceOpt = typer.Option([], "--force", "-f", help="Redo this stage (and everything after it); repeatable.")


def _load(config: Path, overrides: list[str] | None) -> PipelineConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        for p in e.problems:
            err.print(f"[red]error[/red] {p}", highlight=False)
        raise typer.Exit(2) from None


GATES_FAILED = 3  # exit status of `run` / `eval` / `report` when the student fails a gate


def _run(config: Path, overrides, until: str, force: list[str], gate_exit: bool = True) -> None:
    """Run the pipeline up to ``until``; when the eval stage has run, a failed gate exits GATES_FAILED."""
    import json

    from stillroom.pipeline import run_pipeline

    cfg = _load(config, overrides)
    try:
        root = run_pipeline(cfg, until=until, force=set(force))
    except ValueError as e:
        err.print(f"[red]error[/red] {e}")
        raise typer.Exit(2) from None
    verdict = root / "eval" / "verdict.json"
    if until in ("eval", "report") and verdict.exists():
        v = json.loads(verdict.read_text())
        failed = [g["name"] for g in v["gates"] if not g["passed"]]
        if failed:
            err.print(f"[yellow]gates failed[/yellow] ({len(failed)} of {len(v['gates'])}): " + "; ".join(failed))
            if until == "report":
                err.print(f"report: {root / 'report' / 'report.html'}")
            if gate_exit:
                raise typer.Exit(GATES_FAILED)
        else:
            err.print(f"[green]gates passed[/green] ({len(v['gates'])})")
    err.print(f"[green]done[/green]: {root}")


@app.command()
def validate(config: Path = ConfigArg, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Check a config without loading any model; every problem names file, line and field."""
    cfg = _load(config, overrides)
    err.print(f"[green]ok[/green] {config}: run {cfg.run.name!r}, task {cfg.data.task!r}, teacher {cfg.teacher.model!r}")


@app.command()
def run(config: Path = ConfigArg, overrides: Optional[list[str]] = OverridesArg, force: list[str] = ForceOpt) -> None:
    """Run every stage (prepare, generate, select, mix, train, eval, report); finished ones are skipped.
    Exits 3 when the student fails a gate (after writing the report)."""
    _run(config, overrides, "report", force)


@app.command()
def demo(overrides: Optional[list[str]] = OverridesArg, force: list[str] = ForceOpt) -> None:
    """The built-in tool-calling example on the default teacher; writes runs/demo/report/report.html.
    Exits 0 when the loop completes, whether or not the student passes its gates (the report says)."""
    _run(DEMO_CONFIG, overrides, "report", force, gate_exit=False)


def _stage_command(stage: str, doc: str) -> None:
    def command(config: Path = ConfigArg, overrides: Optional[list[str]] = OverridesArg, force: list[str] = ForceOpt) -> None:
        _run(config, overrides, stage, force)

    command.__doc__ = doc + " Runs the stages it needs first, skipping finished ones."
    app.command(name=stage)(command)


for _stage, _doc in (
    ("prepare", "Build the task's examples and their train/dev/eval splits."),
    ("generate", "Sample teacher candidates for the train and dev prompts."),
    ("select", "Verify candidates and keep those that pass."),
    ("mix", "Deduplicate, check contamination against eval, weight the layers."),
    ("train", "Train the student on the selected candidates."),
    ("eval", "Evaluate teacher and student on the held-out split and apply the gates (exit 3 when one fails)."),
    ("report", "Write the run's report.html and report.md (exit 3 when a gate failed)."),
):
    _stage_command(_stage, _doc)


if __name__ == "__main__":
    app()
