"""Versions of students with their lineage, aliases (``production``, ``candidate``) and an audit trail,
in one SQLite file next to the versions' model folders.

    registry/
      registry.sqlite          versions, aliases, events
      versions/v1/model/       a copy of the run's train/model (the run folder can go away)

``register`` reads a finished run: its student, teacher, config hash, data-card hash and eval verdict.
``promote`` moves an alias to a version and refuses one whose gates failed unless forced, recording who
forced it and why. ``rollback`` moves the alias back to the version it pointed to before its last move.
Every change is an event; nothing is deleted.
"""

from __future__ import annotations

import getpass
import json
import shutil
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from stillroom import atomic
from stillroom.rundir import sha256_file

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT UNIQUE NOT NULL,
    model_path TEXT NOT NULL,
    created_at REAL NOT NULL,
    run_dir TEXT NOT NULL,
    teacher TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    data_card_hash TEXT,
    weights_hash TEXT NOT NULL,
    gates_passed INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    summary TEXT NOT NULL,
    serving TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT PRIMARY KEY,
    version_id INTEGER NOT NULL REFERENCES versions(id),
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    action TEXT NOT NULL,
    alias TEXT,
    from_version INTEGER,
    to_version INTEGER,
    actor TEXT NOT NULL,
    forced INTEGER NOT NULL DEFAULT 0,
    reason TEXT
);
"""


class RegistryError(Exception):
    pass


def db_path(root: Path) -> Path:
    return Path(root) / "registry.sqlite"


@contextmanager
def connect(root: Path):
    """A connection in one transaction: committed on success, rolled back on error."""
    Path(root).mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db_path(root), timeout=30, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


def _event(conn, action: str, alias=None, from_version=None, to_version=None, forced=False, reason=None, actor=None) -> None:
    conn.execute("INSERT INTO events (at, action, alias, from_version, to_version, actor, forced, reason) VALUES (?,?,?,?,?,?,?,?)",
                 (time.time(), action, alias, from_version, to_version, actor or getpass.getuser(), int(forced), reason))  # fmt: skip


def register(root: Path, run_dir: Path, actor: str | None = None) -> dict:
    """Copy a finished run's student into the registry as a new version, with its lineage and verdict."""
    run_dir = Path(run_dir)
    model = run_dir / "train" / "model"
    verdict_file = run_dir / "eval" / "verdict.json"
    for need in (model / "config.json", verdict_file, run_dir / "config.yaml"):
        if not need.exists():
            raise RegistryError(f"{run_dir} is not a finished run: {need} is missing (run its eval stage first)")
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    verdict = json.loads(verdict_file.read_text())
    everything = json.loads((run_dir / "eval" / "results.json").read_text())
    results = everything["models"]["student"]
    card = run_dir / "mix" / "card.json"
    summary = {k: results.get(k) for k in ("latency_p50_ms", "latency_p95_ms", "ece", "params")}
    summary["task_success"] = results["metrics"]["task_success"]["mean"]
    recipe_file = run_dir / "compress" / "recipe.json"
    recipe = json.loads(recipe_file.read_text()) if recipe_file.exists() else {"method": "none"}
    serving = {  # what `stillroom serve` needs besides the weights
        "task": cfg.get("data", {}).get("task", "toolcall"),
        "quantize": recipe["method"],
        "teacher": cfg["teacher"],
        "cascade": {k: everything["cascade"][k] for k in ("threshold", "signal", "verifier")} if "cascade" in everything else None,
    }
    with connect(root) as conn:
        n = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM versions").fetchone()[0]
        name = f"v{n}"
        target = Path(root) / "versions" / name / "model"
        with atomic.atomic_dir(target) as tmp:
            shutil.copytree(model, tmp, dirs_exist_ok=True)
        if recipe.get("smoothing"):  # the quantization's smoothing scales travel with the weights
            smoothing = target.parent / recipe["smoothing"]["file"]
            with atomic.atomic_path(smoothing) as tmp:
                shutil.copyfile(run_dir / "compress" / recipe["smoothing"]["file"], tmp)
            serving["smoothing"] = str(smoothing.resolve())
        conn.execute(
            "INSERT INTO versions (name, model_path, created_at, run_dir, teacher, config_hash, data_card_hash, weights_hash,"
            " gates_passed, verdict, summary, serving) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (name, str(target.resolve()), time.time(), str(run_dir.resolve()),
             f"{cfg['teacher']['backend']}:{cfg['teacher']['model']}", sha256_file(run_dir / "config.yaml"),
             sha256_file(card) if card.exists() else None, sha256_file(target / "model.safetensors"),
             int(verdict["passed"]), json.dumps(verdict), json.dumps(summary), json.dumps(serving)),
        )  # fmt: skip
        vid = conn.execute("SELECT id FROM versions WHERE name = ?", (name,)).fetchone()[0]
        _event(conn, "register", to_version=vid, actor=actor)
        return _row(conn.execute("SELECT * FROM versions WHERE id = ?", (vid,)).fetchone())


def _row(r: sqlite3.Row | None) -> dict | None:
    if r is None:
        return None
    d = dict(r)
    d["verdict"], d["summary"], d["serving"] = json.loads(d["verdict"]), json.loads(d["summary"]), json.loads(d["serving"])
    d["gates_passed"] = bool(d["gates_passed"])
    return d


def _version(conn, name: str) -> dict:
    r = _row(conn.execute("SELECT * FROM versions WHERE name = ?", (name,)).fetchone())
    if r is None:
        names = [x[0] for x in conn.execute("SELECT name FROM versions ORDER BY id")]
        raise RegistryError(f"no version {name!r}; versions: {', '.join(names) or 'none'}")
    return r


def promote(root: Path, name: str, alias: str = "production", force: bool = False, reason: str | None = None,
            actor: str | None = None) -> dict:  # fmt: skip
    """Point ``alias`` at version ``name``. A version whose gates failed needs ``force`` and a ``reason``."""
    with connect(root) as conn:
        v = _version(conn, name)
        if not v["gates_passed"]:
            failed = [g["name"] for g in v["verdict"]["gates"] if not g["passed"]]
            if not force:
                raise RegistryError(f"{name} failed {len(failed)} gate(s): {'; '.join(failed)}. "
                                    f"To promote it anyway: --force --reason '...'")  # fmt: skip
            if not reason:
                raise RegistryError("a forced promotion needs --reason: it is recorded with who forced it")
        current = conn.execute("SELECT version_id FROM aliases WHERE alias = ?", (alias,)).fetchone()
        conn.execute("INSERT INTO aliases (alias, version_id, updated_at) VALUES (?,?,?) "
                     "ON CONFLICT(alias) DO UPDATE SET version_id = excluded.version_id, updated_at = excluded.updated_at",
                     (alias, v["id"], time.time()))  # fmt: skip
        _event(conn, "promote", alias, current[0] if current else None, v["id"], forced=not v["gates_passed"], reason=reason, actor=actor)
        return v


def rollback(root: Path, alias: str = "production", actor: str | None = None) -> dict:
    """Move ``alias`` back to the version it pointed to before its last promotion. The alias's history is
    a stack (a promotion pushes, a rollback pops), so repeated rollbacks walk back through it."""
    with connect(root) as conn:
        stack = []
        for e in conn.execute("SELECT action, to_version FROM events WHERE alias = ? ORDER BY id", (alias,)):
            if e["action"] == "promote":
                stack.append(e["to_version"])
            elif e["action"] == "rollback" and stack:
                stack.pop()
        if len(stack) < 2:
            raise RegistryError(f"{alias!r} has no earlier version to roll back to")
        current, previous = stack[-1], stack[-2]
        conn.execute("UPDATE aliases SET version_id = ?, updated_at = ? WHERE alias = ?", (previous, time.time(), alias))
        _event(conn, "rollback", alias, current, previous, actor=actor)
        return _row(conn.execute("SELECT * FROM versions WHERE id = ?", (previous,)).fetchone())


def model_folder(spec: str, root: str | Path) -> str:
    """A model given in the config: a folder as is, or ``registry:ALIAS`` (or ``registry:vN``), the model
    folder of that version in the registry at ``root``."""
    if not spec.startswith("registry:"):
        return spec
    return resolve(Path(root), spec.split(":", 1)[1])["model_path"]


def resolve(root: Path, alias_or_name: str) -> dict:
    """The version an alias points to, or the version of that name."""
    with connect(root) as conn:
        r = conn.execute("SELECT v.* FROM aliases a JOIN versions v ON v.id = a.version_id WHERE a.alias = ?", (alias_or_name,)).fetchone()
        return _row(r) if r is not None else _version(conn, alias_or_name)


def versions(root: Path) -> list[dict]:
    with connect(root) as conn:
        aliases = {}
        for a in conn.execute("SELECT alias, version_id FROM aliases"):
            aliases.setdefault(a["version_id"], []).append(a["alias"])
        return [dict(_row(r), aliases=sorted(aliases.get(r["id"], []))) for r in conn.execute("SELECT * FROM versions ORDER BY id")]


def history(root: Path) -> list[dict]:
    with connect(root) as conn:
        names = {r["id"]: r["name"] for r in conn.execute("SELECT id, name FROM versions")}
        return [dict(dict(e), from_version=names.get(e["from_version"]), to_version=names.get(e["to_version"]))
                for e in conn.execute("SELECT * FROM events ORDER BY id")]  # fmt: skip
