"""Versions of students with their lineage, aliases (``production``, ``candidate``) and an audit trail,
in one SQLite file next to the versions' model folders.

    registry/
      registry.sqlite          versions, aliases, events
      versions/v1/model/       a copy of the run's train/model (the run folder can go away)

``register`` reads a finished run (checked by ``run_check``: stages consistent with its config, verdict
recomputed from its results): its student, teacher, config hash, data-card hash, verdict, and the hash of
every file it copies. ``promote`` moves an alias to a version and refuses one whose gates failed unless
forced, recording who forced it and why. ``rollback`` moves the alias back to the version it pointed to
before its last move, under the same rule. A version's files are re-hashed before it is promoted, rolled
back to or loaded. Every change is an event; nothing is deleted. Reads use read-only snapshots (WAL), so
they never wait for a writer; a writer holds the lock only for a rename and a few rows.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from stillroom.rundir import read_manifest, sha256_file

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
    serving TEXT NOT NULL DEFAULT '{}',
    files TEXT  -- JSON {path in the version folder: sha256}, written at register
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


LOCK_WAIT_S = 10.0  # a writer waits this long for another writer; readers never wait (WAL)


def db_path(root: Path) -> Path:
    return Path(root) / "registry.sqlite"


def _on_disk(root: Path) -> list[str]:
    """Version folders present under ``versions/`` (staging folders of unfinished registrations excluded)."""
    folder = Path(root) / "versions"
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def _check_schema(conn: sqlite3.Connection, root: Path) -> bool:
    """True when the database holds the registry's tables; an emptied one beside version folders is an error."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "versions" in tables:
        return True
    kept = _on_disk(root)
    if kept:
        raise RegistryError(f"{db_path(root)} holds no registry but {Path(root) / 'versions'} holds {', '.join(kept)}: the database "
                            f"was emptied or replaced. Restore it from a backup; nothing was changed.")  # fmt: skip
    return False


def _missing(root: Path) -> RegistryError:
    return RegistryError(f"no registry at {root} (no registry.sqlite there); `stillroom registry register RUN -r {root}` creates one")


def _sqlite_error(root: Path, e: sqlite3.Error) -> RegistryError:
    if "locked" in str(e) or "busy" in str(e):
        return RegistryError(f"the registry at {root} is busy: another command has held its write lock for over {LOCK_WAIT_S:g} s; try again")
    return RegistryError(f"{db_path(root)} cannot be used ({e}); restore it from a backup. Nothing was changed.")


@contextmanager
def connect(root: Path, create: bool = False):
    """A write transaction (``BEGIN IMMEDIATE``): committed on success, rolled back on error. ``create``:
    start a new registry when there is none (only ``register`` does)."""
    root = Path(root)
    if not db_path(root).exists():
        if not create:
            raise _missing(root)
        if _on_disk(root):
            raise RegistryError(f"{db_path(root)} is missing but {root / 'versions'} holds {', '.join(_on_disk(root))}: "
                                f"restore the database from a backup; nothing was changed.")  # fmt: skip
        root.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(db_path(root), timeout=LOCK_WAIT_S, isolation_level=None)
    except sqlite3.Error as e:
        raise _sqlite_error(root, e) from None
    conn.row_factory = sqlite3.Row
    try:
        if not _check_schema(conn, root) and not create:  # before anything is written to the file
            raise _missing(root)
        conn.execute("PRAGMA journal_mode=WAL")  # readers see the last commit and never wait for a writer
        conn.execute("BEGIN IMMEDIATE")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        if "files" not in {r[1] for r in conn.execute("PRAGMA table_info(versions)")}:  # registries made before file hashes
            conn.execute("ALTER TABLE versions ADD COLUMN files TEXT")
    except sqlite3.Error as e:
        conn.close()
        raise _sqlite_error(root, e) from None
    except BaseException:
        conn.close()
        raise
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as e:
        conn.execute("ROLLBACK")
        if isinstance(e, sqlite3.Error):
            raise _sqlite_error(root, e) from None
        raise
    finally:
        conn.close()


@contextmanager
def read(root: Path):
    """A read-only snapshot: never takes a lock a writer holds, never creates anything."""
    root = Path(root)
    if not db_path(root).exists():
        raise _missing(root)
    try:
        conn = sqlite3.connect(db_path(root).resolve().as_uri() + "?mode=ro", uri=True, timeout=LOCK_WAIT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("BEGIN")  # one snapshot for every query below
        if not _check_schema(conn, root):
            raise _missing(root)
    except sqlite3.Error as e:
        raise _sqlite_error(root, e) from None
    try:
        yield conn
    except sqlite3.Error as e:
        raise _sqlite_error(root, e) from None
    finally:
        conn.close()


def _event(conn, action: str, alias=None, from_version=None, to_version=None, forced=False, reason=None, actor=None) -> None:
    conn.execute("INSERT INTO events (at, action, alias, from_version, to_version, actor, forced, reason) VALUES (?,?,?,?,?,?,?,?)",
                 (time.time(), action, alias, from_version, to_version, actor or getpass.getuser(), int(forced), reason))  # fmt: skip


def _hash_folder(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def verify(version: dict) -> None:
    """The version's files are the ones hashed at register: none changed, missing or added."""
    folder = Path(version["model_path"]).parent
    recorded = json.loads(version["files"]) if version.get("files") else None
    if recorded is None:  # registered before file hashes: the weights hash is all there is
        recorded = {"model/model.safetensors": version["weights_hash"]}
        found = {k: sha256_file(folder / k) for k in recorded if (folder / k).is_file()}
    else:
        found = _hash_folder(folder) if folder.is_dir() else {}
    changed = sorted(k for k in set(recorded) | set(found) if recorded.get(k) != found.get(k))
    if changed:
        raise RegistryError(f"version {version['name']}: {', '.join(changed[:5])} in {folder} do not match the hashes recorded at "
                            f"register (changed, missing or added since); refusing to use it. Register the run again.")  # fmt: skip


def served_teacher(run_dir: Path, cfg) -> dict:
    """The teacher a registered cascade escalates to, as the run evaluated it: the corrected one
    (``adapt/model``, with the hash its stage recorded, checked when the server loads it) where
    ``adapt`` ran, prompted with ``teacher.context``."""
    spec = {**cfg.teacher.model_dump(mode="json", include={"backend", "model", "dtype", "context"})}
    if cfg.adapt.enabled:
        adapt = read_manifest(run_dir / "adapt") or {}
        spec.update(model=str((run_dir / "adapt" / "model").resolve()), weights_sha256=adapt.get("outputs", {}).get("model/model.safetensors"))
    return spec


def register(root: Path, run_dir: Path, actor: str | None = None) -> dict:
    """Copy a finished run's student into the registry as a new version, with its lineage and its
    verdict recomputed from the run's results (``run_check``). The copy and its hashes are made before
    the write lock is taken; under it only a rename and the insert happen."""
    import uuid

    from stillroom.plugins import registry as plugin_registry
    from stillroom.run_check import RunCheckError, check

    run_dir = Path(run_dir)
    try:
        run = check(run_dir)
    except RunCheckError as e:
        raise RegistryError(str(e)) from None
    with connect(root, create=True):  # a new registry, or an intact one, before anything is copied
        pass
    results = run.results["models"]["student"]
    card = run_dir / "mix" / "card.json"
    summary = {k: results.get(k) for k in ("latency_p50_ms", "latency_p95_ms", "ece", "params")}
    summary["task_success"] = results["metrics"]["task_success"]["mean"]
    task = plugin_registry().get("task", run.cfg.data.task)
    serving = {  # what `stillroom serve` needs besides the weights
        "task": run.cfg.data.task,
        "task_options": task.serving_options(run.cfg) if hasattr(task, "serving_options") else {},  # how requests are rendered
        "quantize": run.recipe["method"],
        "teacher": served_teacher(run_dir, run.cfg),
        "cascade": {k: run.results["cascade"][k] for k in ("threshold", "signal", "verifier")} if "cascade" in run.results else None,
    }
    smoothing = (run.recipe.get("smoothing") or {}).get("file")
    staging = Path(root) / "versions" / f".staging-{uuid.uuid4().hex}"
    try:
        shutil.copytree(run_dir / "train" / "model", staging / "model")
        if smoothing:  # the quantization's smoothing scales travel with the weights
            shutil.copyfile(run_dir / "compress" / smoothing, staging / smoothing)
        files = _hash_folder(staging)
        placed = None
        try:
            with connect(root) as conn:
                n = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM versions").fetchone()[0]
                name = f"v{n}"
                folder = Path(root) / "versions" / name
                if folder.exists():
                    raise RegistryError(f"{folder} exists but registry.sqlite has no {name} (a registration killed before its commit, "
                                        f"or a database restored from an older copy): move that folder away, then register again")  # fmt: skip
                os.replace(staging, folder)
                placed = folder
                conn.execute(
                    "INSERT INTO versions (name, model_path, created_at, run_dir, teacher, config_hash, data_card_hash, weights_hash,"
                    " gates_passed, verdict, summary, serving, files) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (name, str((folder / "model").resolve()), time.time(), str(run_dir.resolve()),
                     f"{run.cfg.teacher.backend}:{run.cfg.teacher.model}", sha256_file(run_dir / "config.yaml"),
                     sha256_file(card) if card.exists() else None, files["model/model.safetensors"],
                     int(run.verdict["passed"]), json.dumps(run.verdict), json.dumps(summary),
                     json.dumps(dict(serving, smoothing=str((folder / smoothing).resolve()) if smoothing else None)), json.dumps(files)),
                )  # fmt: skip
                vid = conn.execute("SELECT id FROM versions WHERE name = ?", (name,)).fetchone()[0]
                _event(conn, "register", to_version=vid, actor=actor)
                version = _row(conn.execute("SELECT * FROM versions WHERE id = ?", (vid,)).fetchone())
        except BaseException:
            if placed is not None:  # the row was not committed: neither is the folder
                shutil.rmtree(placed, ignore_errors=True)
            raise
        return version
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def _forced_reason(force: bool, reason: str | None, what: str) -> str:
    if not force:
        raise RegistryError(f"{what}. To do it anyway: --force --reason '...'")
    if reason is None or not reason.strip():
        raise RegistryError(f"{what}; forcing it needs --reason (not blank): it is recorded with who forced it")
    return reason.strip()


def _failed(v: dict) -> str:
    failed = [g["name"] for g in v["verdict"]["gates"] if not g["passed"]]
    return f"{v['name']} failed {len(failed)} gate(s): {'; '.join(failed)}"


def promote(root: Path, name: str, alias: str = "production", force: bool = False, reason: str | None = None,
            actor: str | None = None) -> dict:  # fmt: skip
    """Point ``alias`` at version ``name``, whose files must still match their hashes. A version whose
    gates failed needs ``force`` and a non-blank ``reason``; the event records both."""
    with read(root) as conn:
        v = _version(conn, name)
    if not v["gates_passed"]:
        reason = _forced_reason(force, reason, _failed(v))
    verify(v)  # hashing happens outside the write lock
    with connect(root) as conn:
        v = _version(conn, name)
        current = conn.execute("SELECT version_id FROM aliases WHERE alias = ?", (alias,)).fetchone()
        conn.execute("INSERT INTO aliases (alias, version_id, updated_at) VALUES (?,?,?) "
                     "ON CONFLICT(alias) DO UPDATE SET version_id = excluded.version_id, updated_at = excluded.updated_at",
                     (alias, v["id"], time.time()))  # fmt: skip
        forced = not v["gates_passed"]
        _event(conn, "promote", alias, current[0] if current else None, v["id"], forced=forced, reason=reason if forced else None, actor=actor)
        return v


def _rollback_target(conn, alias: str) -> tuple[int, dict]:
    """(current version id, the version before it). The alias's history is a stack: a promotion
    pushes, a rollback pops, so repeated rollbacks walk back through it."""
    stack = []
    for e in conn.execute("SELECT action, to_version FROM events WHERE alias = ? ORDER BY id", (alias,)):
        if e["action"] == "promote":
            stack.append(e["to_version"])
        elif e["action"] == "rollback" and stack:
            stack.pop()
    if len(stack) < 2:
        raise RegistryError(f"{alias!r} has no earlier version to roll back to")
    return stack[-1], _row(conn.execute("SELECT * FROM versions WHERE id = ?", (stack[-2],)).fetchone())


def rollback(root: Path, alias: str = "production", force: bool = False, reason: str | None = None, actor: str | None = None) -> dict:
    """Move ``alias`` back to the version it pointed to before its last promotion. Landing on a version
    whose gates failed (one force-promoted earlier) is refused unless forced again, with a reason."""
    with read(root) as conn:
        _, previous = _rollback_target(conn, alias)
    if not previous["gates_passed"]:
        reason = _forced_reason(force, reason, f"rolling {alias!r} back lands on {_failed(previous)}")
    verify(previous)
    with connect(root) as conn:
        current, target = _rollback_target(conn, alias)
        if target["id"] != previous["id"]:
            raise RegistryError(f"{alias!r} moved while rolling back; run the rollback again")
        conn.execute("UPDATE aliases SET version_id = ?, updated_at = ? WHERE alias = ?", (target["id"], time.time(), alias))
        forced = not target["gates_passed"]
        _event(conn, "rollback", alias, current, target["id"], forced=forced, reason=reason if forced else None, actor=actor)
        return target


def add_gguf(root: Path, name: str, written: dict[str, Path]) -> dict:
    """Move exported GGUF files (``{format: path}``, written beside the registry) into version ``name``'s
    ``gguf/`` folder and record them: their sha256 joins the version's file hashes (``verify`` checks
    them like the weights) and ``serving.gguf`` maps each format to its path in the version folder.
    Re-exporting a format replaces its file. Hashing happens before the write lock is taken."""
    hashes = {f"gguf/{Path(p).name}": sha256_file(Path(p)) for p in written.values()}
    with connect(root) as conn:
        v = _version(conn, name)
        folder = Path(v["model_path"]).parent
        (folder / "gguf").mkdir(exist_ok=True)
        for p in written.values():
            os.replace(p, folder / "gguf" / Path(p).name)
        files = {**json.loads(v["files"] or "{}"), **hashes}
        serving = dict(v["serving"], gguf={**(v["serving"].get("gguf") or {}), **{fmt: f"gguf/{Path(p).name}" for fmt, p in written.items()}})
        conn.execute("UPDATE versions SET files = ?, serving = ? WHERE id = ?", (json.dumps(files), json.dumps(serving), v["id"]))
        _event(conn, "export", to_version=v["id"], reason=", ".join(sorted(written)))
        return _row(conn.execute("SELECT * FROM versions WHERE id = ?", (v["id"],)).fetchone())


def gguf_file(version: dict, fmt: str) -> Path:
    """The path of version's exported GGUF in ``fmt``; a clear error when it was not exported."""
    exported = (version.get("serving") or {}).get("gguf") or {}
    if fmt not in exported:
        raise RegistryError(f"version {version['name']} has no {fmt} GGUF (exported: {', '.join(sorted(exported)) or 'none'}); "
                            f"`stillroom export {version['name']} -r REGISTRY --format {fmt}` writes it")  # fmt: skip
    return Path(version["model_path"]).parent / exported[fmt]


def model_folder(spec: str, root: str | Path) -> str:
    """A model given in the config: a folder as is, or ``registry:ALIAS`` (or ``registry:vN``), the model
    folder of that version in the registry at ``root``."""
    if not spec.startswith("registry:"):
        return spec
    version = resolve(Path(root), spec.split(":", 1)[1])
    verify(version)
    return version["model_path"]


def resolve(root: Path, alias_or_name: str) -> dict:
    """The version an alias points to, or the version of that name."""
    with read(root) as conn:
        r = conn.execute("SELECT v.* FROM aliases a JOIN versions v ON v.id = a.version_id WHERE a.alias = ?", (alias_or_name,)).fetchone()
        return _row(r) if r is not None else _version(conn, alias_or_name)


def versions(root: Path) -> list[dict]:
    with read(root) as conn:
        aliases = {}
        for a in conn.execute("SELECT alias, version_id FROM aliases"):
            aliases.setdefault(a["version_id"], []).append(a["alias"])
        return [dict(_row(r), aliases=sorted(aliases.get(r["id"], []))) for r in conn.execute("SELECT * FROM versions ORDER BY id")]


def history(root: Path) -> list[dict]:
    with read(root) as conn:
        names = {r["id"]: r["name"] for r in conn.execute("SELECT id, name FROM versions")}
        return [dict(dict(e), from_version=names.get(e["from_version"]), to_version=names.get(e["to_version"]))
                for e in conn.execute("SELECT * FROM events ORDER BY id")]  # fmt: skip
