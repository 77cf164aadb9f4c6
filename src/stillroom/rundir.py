"""Run directory and stage cache.

``runs/<name>/`` holds the resolved config and one folder per stage. A stage folder is trusted only
when its ``manifest.json`` says ``complete``, its key matches (hash of the stage's config slice, of
its inputs' output hashes and of the stillroom version) and its files still hash to what the manifest
recorded. The manifest is written last, atomically, so a stage killed at any point leaves nothing a
later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable

from stillroom import atomic

MANIFEST = "manifest.json"


class RunError(Exception):
    """A problem in a run the user can act on (the message says how); the CLI prints it without a traceback."""

TRACKED_PACKAGES = ("stillroom", "torch", "transformers", "accelerate", "gguf", "safetensors", "pyarrow", "pydantic")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def output_files(stage_dir: Path) -> list[Path]:
    """Files a stage produced: everything but the manifest and hidden (temp or scratch) entries."""
    files = []
    for p in sorted(stage_dir.rglob("*")):
        rel = p.relative_to(stage_dir)
        if p.is_file() and rel.name != MANIFEST and not any(part.startswith(".") for part in rel.parts):
            files.append(p)
    return files


def hash_outputs(stage_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(stage_dir)): sha256_file(p) for p in output_files(stage_dir)}


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def read_manifest(stage_dir: Path) -> dict | None:
    try:
        m = json.loads((stage_dir / MANIFEST).read_text())
    except (OSError, ValueError):  # missing, not UTF-8, not JSON: not a manifest to trust
        return None
    return m if isinstance(m, dict) else None


def is_fresh(stage_dir: Path, key: str) -> bool:
    """True when the stage completed with this key and its files are intact."""
    m = read_manifest(stage_dir)
    if not m or m.get("status") != "complete" or m.get("key") != key:
        return False
    return hash_outputs(stage_dir) == m.get("outputs")


@dataclass
class StageContext:
    """What a stage function receives: its folder, the config, and its inputs' folders."""

    name: str
    dir: Path
    cfg: Any  # PipelineConfig
    inputs: dict[str, Path]
    key: str
    counts: dict[str, Any] = field(default_factory=dict)  # the stage adds its figures here
    timings: dict[str, float] = field(default_factory=dict)
    teacher: Any = None  # TeacherConfig of the teacher the stage uses: the corrected one (adapt/model) where `adapt` ran


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], None]
    needs: tuple[str, ...]  # upstream stages whose outputs this one reads
    config: tuple[str, ...]  # dotted config sections its result depends on
    help: str
    version: str = "0.1.0"  # of the stage's code and output format: bump it when either changes its outputs
    external: Callable[[Any], dict[str, str]] | None = None  # config -> hashes of what it reads from outside the run (other models)
    task: bool = False  # renders the task's prompts or judges with it: the task's fingerprint joins the key



def stage_key(stage: Stage, config_view: dict, input_hashes: dict[str, str]) -> str:
    return sha256_json({"stage": stage.name, "config": config_view, "inputs": input_hashes, "code": stage.version})


def write_manifest(ctx: StageContext, config_view: dict, input_hashes: dict[str, str], started: float) -> dict:
    manifest = {
        "stage": ctx.name,
        "status": "complete",
        "key": ctx.key,
        "config": config_view,
        "inputs": input_hashes,
        "outputs": hash_outputs(ctx.dir),
        "counts": ctx.counts,
        "timings": {**ctx.timings, "total_s": round(time.time() - started, 3)},
        "versions": package_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic.write_json(ctx.dir / MANIFEST, manifest)
    return manifest


def outputs_hash(stage_dir: Path) -> str:
    """One hash standing for a completed stage's outputs (what downstream keys include)."""
    m = read_manifest(stage_dir)
    if not m or m.get("status") != "complete":
        raise RuntimeError(f"stage folder {stage_dir} has no complete manifest")
    return sha256_json(m["outputs"])
