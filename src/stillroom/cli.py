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
    from stillroom.registry import RegistryError
    from stillroom.rundir import RunError

    cfg = _load(config, overrides)
    try:
        root = run_pipeline(cfg, until=until, force=set(force))
    except (ValueError, RunError, RegistryError) as e:
        err.print(f"[red]error[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as e:  # a run folder that cannot be written: read-only, full disk, a file where a folder should be
        err.print(f"[red]error[/red] cannot write the run: {e.strerror or e} ({e.filename}); make {cfg.run.dir} writable "
                  f"(or choose another run.dir), then run again", highlight=False)  # fmt: skip
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
def init(
    data_file: Path = typer.Argument(..., help="Chat rows, JSON lines (.jsonl) or Parquet, in the OpenAI chat format."),
    out: Path = typer.Option(Path("stillroom.yaml"), "--out", "-o", help="Where to write the starter config."),
    teacher: str = typer.Option("default", help="Teacher model: `default` or a local model folder."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing config."),
) -> None:  # fmt: skip
    """Inspect a file of chat rows (rows, columns, tools, references, turns, malformed rows) and write a
    starter config for it (data.task: chat) that `stillroom validate` accepts."""
    from stillroom import atomic, chat_data
    from stillroom.starter_config import starter

    if not data_file.exists():
        err.print(f"[red]error[/red] {data_file}: no such file")
        raise typer.Exit(2)
    if out.exists() and not force:
        err.print(f"[red]error[/red] {out} exists; pass --force to overwrite it")
        raise typer.Exit(2)
    try:
        facts = chat_data.inspect(data_file)
        text = starter(data_file, out, teacher, facts)
    except ValueError as e:
        err.print(f"[red]error[/red] {e}")
        raise typer.Exit(2) from None
    for key in ("rows", "good_rows", "with_tools", "with_reference", "with_tool_calls", "multi_turn", "max_assistant_turns"):
        err.print(f"{key.replace('_', ' ')}: {facts[key]}")
    err.print(f"columns: {', '.join(facts['columns'])}; layers: {', '.join(facts['layers'])}; slices: {', '.join(facts['slices'])}")
    for problem in facts["bad_rows"][:10]:
        err.print(f"[yellow]bad row[/yellow] {problem}", highlight=False)
    if len(facts["bad_rows"]) > 10:
        err.print(f"... and {len(facts['bad_rows']) - 10} more bad rows")
    atomic.write_text(out, text)
    err.print(f"[green]wrote[/green] {out}; next: stillroom validate {out}")


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
    ("adapt", "Teacher correction: fine-tune the teacher on the labelled pool before it generates (adapt.enabled)."),
    ("generate", "Sample teacher candidates (multi-step traces included) for the train and dev prompts."),
    ("self_generate", "The student samples its own candidates and the teacher scores them (signals.kind: self)."),
    ("select", "Verify candidates, keep those that pass, build preference pairs."),
    ("mix", "Deduplicate, check contamination against eval, weight the layers."),
    ("train", "Train the student on the selected candidates."),
    ("baseline", "Train the pool-only student: same init and recipe, the labelled pool's references alone (baseline.pool_only)."),
    ("compress", "Write the student's inference recipe (compress.quantize)."),
    ("eval", "Evaluate teacher and student on the held-out split and apply the gates (exit 3 when one fails)."),
    ("report", "Write the run's report.html and report.md (exit 3 when a gate failed)."),
):
    _stage_command(_stage, _doc)


registry_app = typer.Typer(no_args_is_help=True, help="Student versions with lineage, aliases (production, candidate) and history.")
app.add_typer(registry_app, name="registry")
RegistryOpt = typer.Option(Path("registry"), "--registry", "-r", help="Registry folder (registry.sqlite and versions/).")
AliasOpt = typer.Option("production", "--alias", "-a", help="Alias to move or serve.")


def _registry_call(fn, *args, **kwargs):
    from stillroom.registry import RegistryError

    try:
        return fn(*args, **kwargs)
    except RegistryError as e:
        err.print(f"[red]error[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    except OSError as e:  # a registry folder that cannot be written (read-only, a file in its place, a full disk)
        err.print(f"[red]error[/red] cannot use the registry: {e.strerror or e} ({e.filename})", highlight=False)
        raise typer.Exit(2) from None


@registry_app.command("register")
def registry_register(run_dir: Path = typer.Argument(..., help="A finished run folder, e.g. runs/demo."), registry: Path = RegistryOpt) -> None:
    """Copy a finished run's student into the registry as a new version, with teacher, config hash,
    data-card hash and eval verdict."""
    from stillroom import registry as reg

    v = _registry_call(reg.register, registry, run_dir)
    err.print(f"registered [bold]{v['name']}[/bold] from {run_dir} (gates {'passed' if v['gates_passed'] else 'FAILED'})")


@registry_app.command("list")
def registry_list(registry: Path = RegistryOpt) -> None:
    """Every version with its aliases, gate verdict and headline figures."""
    from rich.table import Table

    from stillroom import registry as reg

    table = Table()
    for col in ("version", "aliases", "gates", "task success", "p95 ms", "teacher", "run"):
        table.add_column(col)
    for v in _registry_call(reg.versions, registry):
        ts = v["summary"].get("task_success")
        table.add_row(v["name"], ", ".join(v["aliases"]) or "-", "pass" if v["gates_passed"] else "FAIL",
                      "-" if ts is None else f"{100 * ts:.1f}%", str(v["summary"].get("latency_p95_ms")), v["teacher"], v["run_dir"])  # fmt: skip
    Console().print(table)


@registry_app.command("promote")
def registry_promote(
    version: str = typer.Argument(..., help="Version name, e.g. v3."), alias: str = AliasOpt, registry: Path = RegistryOpt,
    force: bool = typer.Option(False, "--force", help="Promote a version whose gates failed (needs --reason)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why; recorded with who forced it."),
) -> None:  # fmt: skip
    """Point an alias at a version; refuses a version whose gates failed unless --force --reason."""
    from stillroom import registry as reg

    _registry_call(reg.promote, registry, version, alias, force, reason)
    err.print(f"{alias} -> [bold]{version}[/bold]")


@registry_app.command("rollback")
def registry_rollback(
    alias: str = AliasOpt, registry: Path = RegistryOpt,
    force: bool = typer.Option(False, "--force", help="Roll back onto a version whose gates failed (needs --reason)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Why; recorded with who forced it."),
) -> None:  # fmt: skip
    """Move an alias back to the version it pointed to before its last promotion; refuses to land on a
    version whose gates failed unless --force --reason."""
    from stillroom import registry as reg

    v = _registry_call(reg.rollback, registry, alias, force, reason)
    err.print(f"{alias} -> [bold]{v['name']}[/bold] (rolled back)")


@registry_app.command("history")
def registry_history(registry: Path = RegistryOpt) -> None:
    """Every registration, promotion and rollback: when, who, forced or not, why."""
    import datetime

    from stillroom import registry as reg

    for e in _registry_call(reg.history, registry):
        when = datetime.datetime.fromtimestamp(e["at"]).isoformat(timespec="seconds")
        moved = f"{e['alias']}: {e['from_version'] or '-'} -> {e['to_version']}" if e["alias"] else f"{e['to_version']}"
        forced = f" FORCED ({e['reason']})" if e["forced"] else ""
        print(f"{when} {e['actor']} {e['action']} {moved}{forced}")


@app.command()
def export(
    source: str = typer.Argument(..., help="A run folder (its train/model), a model folder, or a registry version or alias (with -r)."),
    registry: Path = RegistryOpt,
    format: Optional[list[str]] = typer.Option(None, "--format", "-f", help="f16, q8_0, q4_0 (repeat the option; default: all three)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder for a run or model folder (default: RUN/export)."),
) -> None:  # fmt: skip
    """Write the student as GGUF files for llama.cpp (SmoothQuant scales folded first). A registry
    version keeps them in its folder (gguf/) with their sha256, checked on load like its weights."""
    from stillroom import export as ex

    formats = format or list(ex.DEFAULT_FORMATS)
    unknown = [f for f in formats if f not in ex.FORMATS]
    if unknown:
        err.print(f"[red]error[/red] --format {', '.join(unknown)}: one of {', '.join(ex.FORMATS)}")
        raise typer.Exit(2)
    folder = Path(source)
    try:
        if (folder / "train" / "model").is_dir():
            written = ex.export_run(folder, out, formats)
        elif (folder / "config.json").is_file():
            written = ex.export_model(folder, out or folder / "export", formats, name=folder.name)
        else:
            version = _registry_call(ex.export_version, registry, source, formats)
            written = {fmt: Path(version["model_path"]).parent / rel for fmt, rel in version["serving"]["gguf"].items() if fmt in formats}
    except ex.ExportError as e:
        err.print(f"[red]error[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    for fmt, path in written.items():
        err.print(f"{fmt}: {path} ({path.stat().st_size / 2**20:.1f} MB)")


@app.command()
def serve(
    registry: Path = RegistryOpt, alias: str = AliasOpt, host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port (0: any free one)."),
    poll: float = typer.Option(0.5, min=0.01, max=3600, help="Seconds between alias checks (hot swap)."),
    cascade: bool = typer.Option(True, help="Serve the version's fitted cascade (student first, teacher when unsure) when it has one."),
    engine: str = typer.Option("torch", help="torch (the student as registered) or llamacpp (its exported GGUF; extra `llamacpp`)."),
    gguf_format: str = typer.Option("q8_0", "--gguf-format", help="llamacpp: which exported GGUF to serve (f16, q8_0, q4_0)."),
) -> None:  # fmt: skip
    """OpenAI-compatible /v1/chat/completions for a registry alias (single model or cascade), with
    /health, /metrics (counts, latency histogram, escalations) and hot swap."""
    from stillroom import engines
    from stillroom import registry as reg
    from stillroom.serve import serve as run_server

    if engine not in engines.ENGINES:
        err.print(f"[red]error[/red] --engine {engine}: one of {', '.join(engines.ENGINES)}")
        raise typer.Exit(2)
    version = _registry_call(reg.resolve, registry, alias)
    _registry_call(reg.verify, version)  # a clear error before anything loads
    if engine == "llamacpp":
        _registry_call(reg.gguf_file, version, gguf_format)
        if problem := engines.llamacpp_available():
            err.print(f"[red]error[/red] {problem}")
            raise typer.Exit(2)
    run_server(registry, alias, host, port, poll, cascade, engine, gguf_format)


if __name__ == "__main__":
    app()
