"""A corpus of bad inputs through the real CLI and real HTTP. Every one gets its exit status or HTTP
status and a one-paragraph message (never a traceback), and nothing outside the run or registry
folder it names is written or deleted: the sandbox around it is hashed before and after."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from finished_runs import make_run, seal, serving, tree
from typer.testing import CliRunner

from stillroom import registry
from stillroom.cli import app

BAD_CONFIG, GATES = 2, 3


@dataclass
class Box:
    """The sandbox a case runs in: a valid config, bait files where a `..` run would write, a registry."""

    root: Path
    tiny: Path
    runs: dict[str, Path]

    @property
    def cfg(self) -> Path:
        return self.root / "cfg.yaml"

    def write(self, name: str, data: bytes | str) -> Path:
        p = self.root / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    def registry(self, *names: str, promote: tuple[str, ...] = ()) -> Path:
        reg = self.root / "registry"
        for n in names:
            registry.register(reg, self.runs[n])
        for v in promote:
            registry.promote(reg, v, force=True, reason="set up by the test")
        return reg

    def run_copy(self, name: str) -> Path:
        run = self.root / "runs" / name
        shutil.copytree(self.runs[name], run)
        return run


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8)
)


def _swap_weights(box: Box, promote: tuple[str, ...] = ()) -> None:
    reg = box.registry("good1", "good2", promote=promote)
    shutil.copyfile(reg / "versions" / "v2" / "model" / "model.safetensors", reg / "versions" / "v1" / "model" / "model.safetensors")


def _edited_verdict(box: Box) -> list[str]:
    run = box.run_copy("bad")
    verdict = json.loads((run / "eval" / "verdict.json").read_text())
    verdict["passed"] = True
    (run / "eval" / "verdict.json").write_text(json.dumps(verdict))
    seal(run)  # even with the manifests re-made to match, the recomputed gates disagree
    return ["registry", "register", str(run), "-r", str(box.root / "registry")]


def _rewritten_config(box: Box) -> list[str]:
    run = box.run_copy("good1")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["lr"] = 0.5  # as if `stillroom prepare other.yaml` had rewritten it after training
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return ["registry", "register", str(run), "-r", str(box.root / "registry")]


def _smoothing_outside(box: Box) -> list[str]:
    run = box.run_copy("good1")
    (run / "compress" / "recipe.json").write_text(json.dumps({"method": "int8_dynamic", "smoothing": {"file": "../../../../evil"}}))
    seal(run)
    return ["registry", "register", str(run), "-r", str(box.root / "registry")]


def _no_results(box: Box) -> list[str]:
    run = box.run_copy("good1")
    (run / "eval" / "results.json").unlink()
    return ["registry", "register", str(run), "-r", str(box.root / "registry")]


def _edited_results(box: Box) -> list[str]:
    run = box.run_copy("bad")
    results = json.loads((run / "eval" / "results.json").read_text())
    results["models"]["student"]["metrics"]["task_success"]["mean"] = 0.99
    (run / "eval" / "results.json").write_text(json.dumps(results))
    return ["registry", "register", str(run), "-r", str(box.root / "registry")]


def _emptied(box: Box) -> list[str]:
    reg = box.registry("good1")
    (reg / "registry.sqlite").write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        (reg / f"registry.sqlite{suffix}").unlink(missing_ok=True)
    return ["registry", "register", str(box.runs["good2"]), "-r", str(reg)]


def _deleted_db(box: Box) -> list[str]:
    reg = box.registry("good1")
    for suffix in ("", "-wal", "-shm"):
        (reg / f"registry.sqlite{suffix}").unlink(missing_ok=True)
    return ["registry", "register", str(box.runs["good2"]), "-r", str(reg)]


def _corrupt(box: Box) -> list[str]:
    reg = box.registry("good1")
    (reg / "registry.sqlite").write_bytes(b"this is not a database, just some bytes " * 100)
    for suffix in ("-wal", "-shm"):
        (reg / f"registry.sqlite{suffix}").unlink(missing_ok=True)
    return ["registry", "list", "-r", str(reg)]


def _rollback_onto_failed(box: Box) -> list[str]:
    reg = box.registry("good1", "bad", "good2")
    registry.promote(reg, "v2", force=True, reason="test")
    registry.promote(reg, "v1")
    registry.promote(reg, "v3")
    registry.rollback(reg)  # v3 -> v1
    return ["registry", "rollback", "-r", str(reg)]  # v1 -> v2, which failed its gates


def _orphan_folder(box: Box) -> list[str]:
    reg = box.registry("good1")
    shutil.copytree(reg / "versions" / "v1", reg / "versions" / "v2")  # a register killed between its rename and its commit
    return ["registry", "register", str(box.runs["good2"]), "-r", str(reg)]


def _truncated_version(box: Box) -> list[str]:
    reg = box.registry("good1")
    weights = reg / "versions" / "v1" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return ["registry", "promote", "v1", "-r", str(reg)]


def _added_file(box: Box) -> list[str]:
    reg = box.registry("good1")
    (reg / "versions" / "v1" / "model" / "pytorch_model.bin").write_bytes(b"not the registered weights")
    return ["registry", "promote", "v1", "-r", str(reg)]


def _linked_stage(box: Box) -> list[str]:
    """runs/a/prepare links to the user's own folder: redoing prepare would empty it."""
    (box.root / "runs" / "a").mkdir(parents=True)
    (box.root / "runs" / "a" / "prepare").symlink_to(box.root / "prepare", target_is_directory=True)
    return ["prepare", str(box.cfg)]


def _weights_as_bin(box: Box) -> list[str]:
    run = box.run_copy("good1")
    (run / "train" / "model" / "model.safetensors").rename(run / "train" / "model" / "pytorch_model.bin")
    return ["registry", "register", str(run), "-r", str(box.root / "registry")]


def _prepared(box: Box, name: str, data: bytes) -> list[str]:
    """A run whose prepare stage finished, then one of its files overwritten."""
    assert CliRunner().invoke(app, ["prepare", str(box.cfg)]).exit_code == 0
    (box.root / "runs" / "a" / "prepare" / name).write_bytes(data)
    return ["prepare", str(box.cfg)]

def _reg(*names: str, promote: tuple[str, ...] = ()) -> Callable[[Box], str]:
    return lambda box: str(box.registry(*names, promote=promote))


# (id, setup -> argv, exit status, words the message must hold, folder the command may write (relative to the box))
CASES: list[tuple[str, Callable[[Box], list[str]], int, str, str | None]] = [
    # config: paths confined (issue item 1)
    ("run-name-dotdot", lambda b: ["prepare", str(b.cfg), f"run.dir={b.root}/runs", "run.name=.."], BAD_CONFIG, "run.name", None),
    ("run-name-validate", lambda b: ["validate", str(b.cfg), "run.name=.."], BAD_CONFIG, "no `..`", None),
    ("run-name-up-and-over", lambda b: ["prepare", str(b.cfg), "run.name=../escape"], BAD_CONFIG, "run.name", None),
    ("run-name-separator", lambda b: ["prepare", str(b.cfg), "run.name=a/b"], BAD_CONFIG, "run.name", None),
    ("run-name-absolute", lambda b: ["prepare", str(b.cfg), "run.name=/tmp/x"], BAD_CONFIG, "run.name", None),
    ("run-name-dot", lambda b: ["prepare", str(b.cfg), "run.name=."], BAD_CONFIG, "run.name", None),
    ("run-name-hidden", lambda b: ["validate", str(b.cfg), "run.name=.hidden"], BAD_CONFIG, "run.name", None),
    ("run-name-too-long", lambda b: ["validate", str(b.cfg), "run.name=" + "a" * 200], BAD_CONFIG, "run.name", None),
    # config: messages, not tracebacks (items 9, 10, 11)
    ("non-utf8", lambda b: ["validate", str(b.write("latin.yaml", b"run:\n  name: caf\xe9\n"))], BAD_CONFIG, "not UTF-8", None),
    ("override-malformed", lambda b: ["validate", str(b.cfg), "train.epochs=[1,"], BAD_CONFIG, "not valid YAML", None),
    ("override-no-equals", lambda b: ["validate", str(b.cfg), "train.epochs"], BAD_CONFIG, "FIELD.PATH=VALUE", None),
    ("override-empty-key", lambda b: ["validate", str(b.cfg), "train..epochs=2"], BAD_CONFIG, "empty field name", None),
    ("override-into-value", lambda b: ["validate", str(b.cfg), "run=3", "run.name=x"], BAD_CONFIG, "not a section", None),
    ("lr-inf", lambda b: ["validate", str(b.cfg), "train.lr=.inf"], BAD_CONFIG, "finite", None),
    ("lr-nan", lambda b: ["validate", str(b.cfg), "train.lr=.nan"], BAD_CONFIG, "finite", None),
    ("layer-weight-inf", lambda b: ["validate", str(b.cfg), "data.layer_weights={core: .inf}"], BAD_CONFIG, "finite", None),
    ("gate-bound-inf", lambda b: ["validate", str(b.cfg), "eval.gates=[{metric: ece, max: .inf}]"], BAD_CONFIG, "finite", None),
    ("lora-unknown-key", lambda b: ["validate", str(b.cfg), "train.lora={r: 4, rnk: 2}"], BAD_CONFIG, "allowed: r, alpha, dropout", None),
    ("gate-unknown-key", lambda b: ["validate", str(b.cfg), "eval.gates=[{metric: ece, max: 0.1, maxx: 1}]"], BAD_CONFIG,
     "did you mean `max`? allowed: metric, per, vs", None),
    ("empty-file", lambda b: ["validate", str(b.write("empty.yaml", ""))], BAD_CONFIG, "empty", None),
    ("comments-only", lambda b: ["prepare", str(b.write("comments.yaml", "# nothing here\n"))], BAD_CONFIG, "empty", None),
    ("alias-bomb", lambda b: ["validate", str(b.write("bomb.yaml", BOMB))], BAD_CONFIG, "expands to over", None),
    ("huge-file", lambda b: ["validate", str(b.write("huge.yaml", "# " + "x" * (2 << 20)))], BAD_CONFIG, "over", None),
    ("deep-nesting", lambda b: ["validate", str(b.write("deep.yaml", "[" * 50_000))], BAD_CONFIG, "nested too deeply", None),
    ("top-level-list", lambda b: ["validate", str(b.write("list.yaml", "- run\n- train\n"))], BAD_CONFIG, "mapping", None),
    ("not-yaml", lambda b: ["validate", str(b.write("tabs.yaml", "run:\n\tname: x\n"))], BAD_CONFIG, "not valid YAML", None),
    ("missing-file", lambda b: ["validate", str(b.root / "nope.yaml")], BAD_CONFIG, "cannot read config", None),
    ("config-is-a-folder", lambda b: ["validate", str(b.root)], BAD_CONFIG, "cannot read config", None),
    ("unknown-section", lambda b: ["validate", str(b.write("typo.yaml", "trian:\n  epochs: 2\n"))], BAD_CONFIG, "did you mean `train`", None),
    ("epochs-zero", lambda b: ["validate", str(b.cfg), "train.epochs=0"], BAD_CONFIG, "train.epochs", None),
    ("seed-text", lambda b: ["validate", str(b.cfg), "run.seed=abc"], BAD_CONFIG, "run.seed", None),
    ("unknown-force-stage", lambda b: ["prepare", str(b.cfg), "--force", "trian"], BAD_CONFIG, "unknown stage", None),
    ("python-tag", lambda b: ["validate", str(b.write("tag.yaml", "run: !!python/object/apply:os.system ['echo hi']\n"))], BAD_CONFIG,
     "not valid YAML", None),
    ("lr-overflows-to-inf", lambda b: ["validate", str(b.cfg), "train.lr=1.0e400"], BAD_CONFIG, "finite", None),
    ("serve-poll-zero", lambda b: ["serve", "-r", str(b.root / "registry"), "--poll", "0"], BAD_CONFIG, "--poll", None),
    ("serve-port-out-of-range", lambda b: ["serve", "-r", str(b.root / "registry"), "--port", "70000"], BAD_CONFIG, "--port", None),
    ("stage-folder-is-a-link", _linked_stage, BAD_CONFIG, "outside the run", "runs/a"),
    ("run-dir-is-a-file", lambda b: ["prepare", str(b.cfg), f"run.dir={b.write('afile', 'x')}"], BAD_CONFIG, "cannot write the run", None),
    # registry: integrity, confinement and messages (items 2-6, 9, 11)
    ("list-no-registry", lambda b: ["registry", "list", "-r", str(b.root / "typo")], BAD_CONFIG, "no registry at", None),
    ("history-no-registry", lambda b: ["registry", "history", "-r", str(b.root / "typo")], BAD_CONFIG, "no registry at", None),
    ("promote-no-registry", lambda b: ["registry", "promote", "v1", "-r", str(b.root / "typo")], BAD_CONFIG, "no registry at", None),
    ("serve-no-registry", lambda b: ["serve", "-r", str(b.root / "typo")], BAD_CONFIG, "no registry at", None),
    ("serve-unknown-engine", lambda b: ["serve", "-r", str(b.root / "registry"), "--engine", "vllm"], BAD_CONFIG, "--engine vllm", None),
    ("serve-llamacpp-not-exported", lambda b: (b.registry("good1", promote=("v1",)), ["serve", "-r", str(b.root / "registry"), "--engine", "llamacpp"])[1],
     BAD_CONFIG, "stillroom export v1", "registry"),
    ("export-unknown-format", lambda b: ["export", str(b.runs["good1"]), "--format", "q3_k"], BAD_CONFIG, "--format q3_k", None),
    ("export-no-version", lambda b: (b.registry("good1"), ["export", "v9", "-r", str(b.root / "registry")])[1], BAD_CONFIG, "no version 'v9'", "registry"),
    ("emptied-database", _emptied, BAD_CONFIG, "was emptied or replaced", None),
    ("deleted-database", _deleted_db, BAD_CONFIG, "is missing", None),
    ("corrupt-database", _corrupt, BAD_CONFIG, "restore it from a backup", None),
    ("orphan-version-folder", _orphan_folder, BAD_CONFIG, "move that folder away", None),
    ("register-no-results", _no_results, BAD_CONFIG, "results.json is missing", None),
    ("register-no-run", lambda b: ["registry", "register", str(b.root / "nope"), "-r", str(b.root / "registry")], BAD_CONFIG,
     "not a finished run", None),
    ("register-edited-verdict", _edited_verdict, BAD_CONFIG, "edited or is stale", None),
    ("register-edited-results", _edited_results, BAD_CONFIG, "differ from what its manifest recorded", None),
    ("register-rewritten-config", _rewritten_config, BAD_CONFIG, "other settings than config.yaml", None),
    ("register-smoothing-outside", _smoothing_outside, BAD_CONFIG, "plain file name", None),
    ("promote-unknown", lambda b: ["registry", "promote", "v9", "-r", _reg("good1")(b)], BAD_CONFIG, "no version 'v9'", "registry"),
    ("promote-failed", lambda b: ["registry", "promote", "v1", "-r", _reg("bad")(b)], BAD_CONFIG, "failed 1 gate", "registry"),
    ("promote-blank-reason", lambda b: ["registry", "promote", "v1", "-r", _reg("bad")(b), "--force", "--reason", " "], BAD_CONFIG,
     "not blank", "registry"),
    ("promote-no-reason", lambda b: ["registry", "promote", "v1", "-r", _reg("bad")(b), "--force"], BAD_CONFIG, "needs --reason", "registry"),
    ("rollback-nothing-earlier", lambda b: ["registry", "rollback", "-r", _reg("good1", promote=("v1",))(b)], BAD_CONFIG,
     "no earlier version", "registry"),
    ("rollback-onto-failed", _rollback_onto_failed, BAD_CONFIG, "lands on v2 failed 1 gate", "registry"),
    ("rollback-blank-reason", lambda b: [*_rollback_onto_failed(b), "--force", "--reason", "  "], BAD_CONFIG, "not blank", "registry"),
    ("promote-swapped-weights", lambda b: (_swap_weights(b), ["registry", "promote", "v1", "-r", str(b.root / "registry")])[1],
     BAD_CONFIG, "do not match the hashes recorded", "registry"),
    ("serve-swapped-weights", lambda b: (_swap_weights(b, promote=("v1",)), ["serve", "-r", str(b.root / "registry")])[1],
     BAD_CONFIG, "model/model.safetensors", "registry"),
    ("promote-truncated-weights", _truncated_version, BAD_CONFIG, "do not match the hashes recorded", "registry"),
    ("promote-added-file", _added_file, BAD_CONFIG, "pytorch_model.bin", "registry"),
    ("register-weights-not-safetensors", _weights_as_bin, BAD_CONFIG, "model.safetensors is missing", None),
    ("registry-is-a-file", lambda b: ["registry", "register", str(b.runs["good1"]), "-r", str(b.write("reg", "x"))], BAD_CONFIG,
     "cannot use the registry", None),
    # data: the task's settings, and a run's own data files edited or broken (detected, redone, nothing else touched)
    ("data-task-unknown", lambda b: ["validate", str(b.cfg), "data.task=chess"], BAD_CONFIG, "data.task", None),
    ("data-weights-zero", lambda b: ["validate", str(b.cfg), "data.layer_weights={core: 0, failure: 0}"], BAD_CONFIG, "positive sum", None),
    ("data-layer-unknown", lambda b: ["validate", str(b.cfg), "data.layer_weights={core: 1, hard: 1}"], BAD_CONFIG, "unknown layer", None),
    ("data-fractions", lambda b: ["validate", str(b.cfg), "data.eval_fraction=0.6", "data.dev_fraction=0.5"], BAD_CONFIG, "below 1", None),
    ("data-too-few", lambda b: ["validate", str(b.cfg), "data.n_examples=3"], BAD_CONFIG, "data.n_examples", None),
    ("data-split-edited", lambda b: _prepared(b, "train.jsonl", b'{"not": "an example"}\n'), 0, "prepare: done", "runs/a"),
    ("data-manifest-garbage", lambda b: _prepared(b, "manifest.json", b"\x00\xff garbage"), 0, "prepare: done", "runs/a"),
    ("data-manifest-a-list", lambda b: _prepared(b, "manifest.json", b"[1, 2]"), 0, "prepare: done", "runs/a"),
    ("data-examples-truncated", lambda b: _prepared(b, "eval.jsonl", b'{"id": "x", "mess'), 0, "prepare: done", "runs/a"),
]



@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finished")
    return {name: make_run(root, name, seed, passed, tiny_model_dir)
            for name, seed, passed in (("good1", 1, True), ("good2", 2, True), ("bad", 3, False))}  # fmt: skip


@pytest.fixture
def box(tmp_path, tiny_model_dir, finished) -> Box:
    b = Box(tmp_path / "box", tiny_model_dir, finished)
    b.root.mkdir()
    cfg = {"run": {"name": "a", "dir": str(b.root / "runs")}, "teacher": {"model": str(tiny_model_dir)},
           "student": {"pruned_from": "teacher", "keep_layers": 2}, "data": {"n_examples": 20, "held_out_functions": 1}}  # fmt: skip
    b.cfg.write_text(yaml.safe_dump(cfg))
    b.write("config.yaml", "a user's own file, beside the runs\n")  # where `run.name=..` used to write
    (b.root / "prepare").mkdir()
    b.write("prepare/keep.txt", "a sibling folder's file\n")  # what `run.name=..` used to delete
    return b


def assert_message(output: str, words: str) -> None:
    """One paragraph (wrapped lines, no blank line), no traceback, holding ``words``."""
    assert "Traceback" not in output and "\n\n" not in output.strip(), output
    assert words in " ".join(output.split()), output


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_gets_a_message_and_touches_nothing_else(box, case):
    _, setup, status, words, may_write = case
    argv = setup(box)
    skip = box.root / may_write if may_write else None
    before = tree(box.root, skip)
    result = CliRunner().invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == status, result.output
    assert_message(result.output, words)
    assert tree(box.root, skip) == before


def test_the_corpus_is_large_enough():
    """The issue's reproductions plus at least twenty more (the HTTP corpus below adds its own)."""
    assert len(CASES) >= 45 and len(HTTP_CASES) >= 20


def test_reads_never_wait_for_a_writer_and_a_busy_writer_gets_a_message(box, monkeypatch):
    reg = box.registry("good1", "good2", promote=("v1",))
    holder = sqlite3.connect(reg / "registry.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    try:
        monkeypatch.setattr(registry, "LOCK_WAIT_S", 0.2)
        for argv in (["registry", "list"], ["registry", "history"]):
            shown = CliRunner().invoke(app, [*argv, "-r", str(reg)])
            assert shown.exit_code == 0 and "v1" in shown.output, shown.output
        busy = CliRunner().invoke(app, ["registry", "promote", "v2", "-r", str(reg)])
        assert busy.exit_code == BAD_CONFIG
        assert_message(busy.output, "is busy: another command has held its write lock")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert registry.resolve(reg, "production")["name"] == "v1"  # the refused write changed nothing


# HTTP: (id, request body or raw bytes, status, words in the error message)
LONG = "hello " * 5000  # ~5,000 tokens: over the tiny model's 2,048 positions, under the body cap
HTTP_CASES: list[tuple[str, dict | bytes, int, str]] = [
    ("not-json", b"{not json", 400, "not valid JSON"),
    ("json-list", b"[1, 2]", 400, "body"),
    ("body-over-cap", json.dumps({"model": "production", "messages": [{"role": "user", "content": "x" * 300_000}]}).encode(), 413, "over"),
    ("unknown-model", {"model": "gpt-9"}, 404, "unknown model"),
    ("no-model", {"model": None}, 400, "model"),
    ("max-tokens-negative", {"max_tokens": -5}, 400, "max_tokens"),
    ("max-tokens-zero", {"max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-huge", {"max_tokens": 10**30}, 400, "max_tokens"),
    ("max-tokens-text", {"max_tokens": "many"}, 400, "max_tokens"),
    ("temperature-negative", {"temperature": -1}, 400, "temperature"),
    ("temperature-over", {"temperature": 3}, 400, "temperature"),
    ("temperature-vanishing", {"temperature": 1e-300}, 400, "temperature"),
    ("temperature-nan", b'{"model": "production", "temperature": NaN, "messages": [{"role": "user", "content": "hi"}]}', 400, "temperature"),
    ("top-p-zero", {"top_p": 0}, 400, "top_p"),
    ("top-p-over", {"top_p": 1.5}, 400, "top_p"),
    ("seed-negative", {"seed": -1}, 400, "seed"),
    ("seed-over-64-bits", {"seed": 2**64}, 400, "seed"),
    ("n-two", {"n": 2}, 400, "n"),
    ("stream", {"stream": True}, 400, "streaming is not supported"),
    ("no-messages", {"messages": []}, 400, "messages"),
    ("too-many-messages", {"messages": [{"role": "user", "content": "hi"}] * 65}, 400, "messages"),
    ("bad-role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ("content-not-text", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("prompt-over-context", {"messages": [{"role": "user", "content": LONG}]}, 400, "over the model's context of 2048"),
    ("max-tokens-past-context", {"max_tokens": 512, "messages": [{"role": "user", "content": "hello " * 1700}]}, 400, "context"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory, finished):
    with serving(tmp_path_factory.mktemp("served") / "registry", [finished["good1"]]) as url:
        yield url


def chat_counts(url: str) -> dict[str, int]:
    counts = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('stillroom_requests_total{path="/v1/chat/completions"'):
            status = line.split('status="')[1].split('"')[0]
            counts[status] = counts.get(status, 0) + int(line.rsplit(" ", 1)[1])
    return counts


def test_bad_requests_get_a_status_and_a_message_and_metrics_count_every_response(server):
    url = server
    sent: dict[str, int] = {}
    with httpx.Client(timeout=60) as c:
        for name, body, status, words in HTTP_CASES:
            if isinstance(body, dict):
                body = json.dumps({"model": "production", "messages": [{"role": "user", "content": "hi"}], **body}).encode()
            r = c.post(f"{url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status, (name, r.text)
            message = r.json()["error"]["message"]
            assert words in message and "Traceback" not in message and "\n" not in message, (name, message)
            sent[str(status)] = sent.get(str(status), 0) + 1
        ok = c.post(f"{url}/v1/chat/completions", json={"model": "production", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200  # still serving
        sent["200"] = sent.get("200", 0) + 1
    assert chat_counts(url) == sent
