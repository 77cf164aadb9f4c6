"""What `registry register` may believe about a finished run, re-derived from the run's own files.

A run folder is editable by anyone who can write it, so nothing in it is taken on its word:

- every stage up to ``eval`` has a complete manifest, its files still hash to what that manifest recorded,
  it ran with the settings now in ``config.yaml`` and on the outputs now in its input stages (a stage
  re-run with other settings after training shows as a mismatch, not as a quiet new config hash);
- the verdict is recomputed from ``eval/results.json`` with the gates and targets of ``config.yaml``;
  an ``eval/verdict.json`` that says otherwise is refused as edited or stale.

Forging all of it (results, manifests and config together) is not detected: that needs a signature,
which a local file cannot keep secret from whoever can edit the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from stillroom import gates
from stillroom.config import ConfigError, PipelineConfig, stage_view, validate
from stillroom.rundir import hash_outputs, outputs_hash, read_manifest


class RunCheckError(Exception):
    pass


@dataclass(frozen=True)
class FinishedRun:
    cfg: PipelineConfig
    results: dict  # eval/results.json
    verdict: dict  # recomputed, never read from verdict.json
    recipe: dict  # compress/recipe.json, or {"method": "none"}


def _json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise RunCheckError(f"cannot read {path} ({e.strerror}): {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RunCheckError(f"{path} is not valid JSON: {what}; redo it with `stillroom eval CONFIG --force eval`") from None


def read_config(run_dir: Path) -> PipelineConfig:
    """The run's resolved config, validated as at the start of a run (model folders need not exist any more)."""
    path = run_dir / "config.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
        return validate(raw if isinstance(raw, dict) else {}, source=path, check_paths=False)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RunCheckError(f"cannot read {path}: {e}") from None
    except ConfigError as e:
        raise RunCheckError(f"{path} is not a valid config: {'; '.join(e.problems)}") from None


def check_stages(run_dir: Path, cfg: PipelineConfig, until: str = "eval") -> None:
    """Every stage up to ``until``: complete, intact, run with ``cfg``'s settings on its inputs' current outputs."""
    from stillroom.pipeline import _stages, upstream

    redo = f"rerun `stillroom {until} CONFIG` so every stage matches {run_dir / 'config.yaml'}, then register again"
    for st in upstream(_stages(cfg), until):
        folder = run_dir / st.name
        m = read_manifest(folder)
        if not m or m.get("status") != "complete":
            raise RunCheckError(f"{run_dir} is not a finished run: stage {st.name} has no complete manifest; {redo}")
        if hash_outputs(folder) != m.get("outputs"):
            raise RunCheckError(f"{folder}: files differ from what its manifest recorded (edited after the run?); {redo}")
        view = stage_view(cfg, list(st.config))
        changed = sorted(k for k in view if m.get("config", {}).get(k) != view[k])
        if changed:
            raise RunCheckError(f"stage {st.name} ran with other settings than config.yaml holds now "
                                f"({', '.join(changed)}; an earlier stage was re-run with another config?); {redo}")  # fmt: skip
        for need in st.needs:
            if m.get("inputs", {}).get(need) != outputs_hash(run_dir / need):
                raise RunCheckError(f"stage {st.name} ran on other {need} outputs than the run holds now; {redo}")


def check(run_dir: Path) -> FinishedRun:
    run_dir = Path(run_dir)
    model = run_dir / "train" / "model"
    for need in (run_dir / "config.yaml", model / "config.json", model / "model.safetensors", run_dir / "eval" / "results.json"):
        if not need.exists():
            raise RunCheckError(f"{run_dir} is not a finished run: {need} is missing (run its eval stage first: `stillroom eval CONFIG`)")
    cfg = read_config(run_dir)
    check_stages(run_dir, cfg)
    results = _json(run_dir / "eval" / "results.json", "the eval stage's figures")
    if "student" not in results.get("models", {}):
        raise RunCheckError(f"{run_dir / 'eval' / 'results.json'} has no student figures; redo it with `stillroom eval CONFIG --force eval`")
    verdict = gates.verdict(results, cfg.eval.gates, cfg.targets)
    written = _json(run_dir / "eval" / "verdict.json", "the eval stage's verdict")
    said = [(g.get("name"), g.get("passed")) for g in written.get("gates", [])]
    if written.get("passed") != verdict["passed"] or said != [(g["name"], g["passed"]) for g in verdict["gates"]]:
        raise RunCheckError(f"{run_dir / 'eval' / 'verdict.json'} says passed={written.get('passed')}, but the gates of config.yaml "
                            f"applied to eval/results.json say passed={verdict['passed']}: the verdict was edited or is stale; "
                            f"redo it with `stillroom eval CONFIG --force eval`")  # fmt: skip
    recipe_file = run_dir / "compress" / "recipe.json"
    recipe = _json(recipe_file, "the compress stage's recipe") if recipe_file.exists() else {"method": "none"}
    smoothing = (recipe.get("smoothing") or {}).get("file")
    if smoothing is not None and (Path(smoothing).name != smoothing or smoothing.startswith(".")):
        raise RunCheckError(f"{recipe_file}: smoothing file {smoothing!r} must be a plain file name inside compress/")
    return FinishedRun(cfg, results, verdict, recipe)
