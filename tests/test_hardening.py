"""Issue 15's reproductions, one test per defect, through the real CLI (a subprocess where the whole
command matters) or real HTTP. tests/test_bad_inputs.py runs the same inputs and many more as a corpus."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from finished_runs import files_of, make_run, running, serving, tree
from typer.testing import CliRunner

from stillroom import registry
from stillroom.cli import app
from stillroom.registry import RegistryError
from stillroom.rundir import sha256_file

BAD_INPUT = 2


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stillroom.cli", *map(str, args)], capture_output=True, text=True, check=False)


def invoke(*args):
    """The CLI in process; ``output`` with its wrapped lines joined back (the console wraps at 80 columns)."""
    result = CliRunner().invoke(app, list(map(str, args)))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "\n\n" not in result.output.strip()
    result.said = " ".join(result.output.split())
    return result


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finished")
    return {name: make_run(root, name, seed, passed, tiny_model_dir)
            for name, seed, passed in (("good1", 1, True), ("good2", 2, True), ("bad", 3, False))}  # fmt: skip


def test_1_a_run_name_with_dotdot_writes_nothing_outside_run_dir(tmp_path, tiny_model_dir):
    """`$S prepare base.yaml run.dir=$PWD/sb/runs run.name=..` overwrote sb/config.yaml and deleted sb/prepare/*."""
    sb = tmp_path / "sb"
    (sb / "prepare").mkdir(parents=True)
    (sb / "config.yaml").write_text("mine\n")
    (sb / "prepare" / "notes.txt").write_text("mine too\n")
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"teacher": {"model": str(tiny_model_dir)}, "student": {"pruned_from": "teacher", "keep_layers": 2}}))
    before = files_of(tmp_path)
    for command in ("validate", "prepare"):
        proc = cli(command, base, f"run.dir={sb / 'runs'}", "run.name=..")
        assert proc.returncode == BAD_INPUT and "command line: run.name: must be one folder name" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert files_of(tmp_path) == before and not (sb / "runs").exists()


def test_2_an_emptied_registry_is_never_recreated_over_its_versions(tmp_path, finished):
    reg = tmp_path / "registry"
    assert invoke("registry", "register", finished["good1"], "-r", reg).exit_code == 0
    kept = files_of(reg / "versions")
    (reg / "registry.sqlite").write_bytes(b"")
    again = invoke("registry", "register", finished["good2"], "-r", reg)
    assert again.exit_code == BAD_INPUT and "was emptied or replaced" in again.said
    assert invoke("registry", "list", "-r", reg).exit_code == BAD_INPUT
    assert files_of(reg / "versions") == kept and (reg / "registry.sqlite").read_bytes() == b""


def test_3_rollback_never_lands_on_a_failed_version_unless_forced_and_recorded(tmp_path, finished):
    reg = str(tmp_path / "registry")
    for name in ("good1", "bad", "good2"):  # v1 passes, v2 fails its gates, v3 passes
        assert invoke("registry", "register", finished[name], "-r", reg).exit_code == 0
    assert invoke("registry", "promote", "v2", "-r", reg, "--force", "--reason", "demo for a customer").exit_code == 0
    assert invoke("registry", "promote", "v1", "-r", reg).exit_code == 0
    assert invoke("registry", "promote", "v3", "-r", reg).exit_code == 0
    assert invoke("registry", "rollback", "-r", reg).exit_code == 0  # v3 -> v1
    refused = invoke("registry", "rollback", "-r", reg)  # v1 -> v2 failed its gates
    assert refused.exit_code == BAD_INPUT and "lands on v2 failed 1 gate" in refused.said
    assert registry.resolve(Path(reg), "production")["name"] == "v1"
    assert invoke("registry", "rollback", "-r", reg, "--force", "--reason", "customer asked again").exit_code == 0
    assert registry.resolve(Path(reg), "production")["name"] == "v2"
    moves = [e for e in registry.history(Path(reg)) if e["action"] in ("promote", "rollback")]
    assert [(e["action"], e["to_version"], bool(e["forced"])) for e in moves] == [
        ("promote", "v2", True), ("promote", "v1", False), ("promote", "v3", False), ("rollback", "v1", False), ("rollback", "v2", True)]
    assert "rollback production: v1 -> v2 FORCED (customer asked again)" in invoke("registry", "history", "-r", reg).said


def test_4_a_hand_edited_verdict_is_not_believed(tmp_path, finished):
    run = tmp_path / "bad"
    shutil.copytree(finished["bad"], run)
    verdict = json.loads((run / "eval" / "verdict.json").read_text())
    verdict["passed"] = True
    verdict["gates"][0]["passed"] = True
    (run / "eval" / "verdict.json").write_text(json.dumps(verdict))
    (run / "eval" / "manifest.json").write_text(  # the manifest forged to match as well
        (run / "eval" / "manifest.json").read_text().replace(
            json.loads((run / "eval" / "manifest.json").read_text())["outputs"]["verdict.json"], sha256_file(run / "eval" / "verdict.json")))
    refused = invoke("registry", "register", run, "-r", tmp_path / "registry")
    assert refused.exit_code == BAD_INPUT and "the verdict was edited or is stale" in refused.said
    assert not (tmp_path / "registry").exists()
    # unedited, it registers as failed and promotion is refused
    reg = tmp_path / "registry2"
    assert "gates FAILED" in invoke("registry", "register", finished["bad"], "-r", reg).said
    assert invoke("registry", "promote", "v1", "-r", reg).exit_code == BAD_INPUT


def test_5_a_swapped_weights_file_is_never_served(tmp_path, finished):
    from stillroom.serve import create_app

    reg = tmp_path / "registry"
    with serving(reg, [finished["good1"], finished["good2"]]) as url:
        shutil.copyfile(reg / "versions" / "v1" / "model" / "model.safetensors", reg / "versions" / "v2" / "model" / "model.safetensors")
        refused = invoke("registry", "promote", "v2", "-r", reg)
        assert refused.exit_code == BAD_INPUT and "model/model.safetensors" in refused.said
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "production", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["model"] == "v1"
        assert httpx.get(f"{url}/health").json()["version"] == "v1"
    registry.promote(reg, "v1")  # a version tampered with after its promotion: the server does not start on it
    shutil.copyfile(finished["good2"] / "train" / "model" / "model.safetensors", reg / "versions" / "v1" / "model" / "model.safetensors")
    with pytest.raises(RegistryError, match="do not match the hashes recorded at register"):
        create_app(reg, "production")
    served = invoke("serve", "-r", reg)
    assert served.exit_code == BAD_INPUT and "refusing to use it" in served.said


def test_6_a_config_rewritten_by_an_earlier_stage_is_refused_at_register(tmp_path, finished):
    """The run's config.yaml rewritten by `prepare` with other settings; train and eval are from the old ones."""
    run = tmp_path / "runs" / "good1"
    shutil.copytree(finished["good1"], run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["run"]["dir"], cfg["train"]["lr"], cfg["data"]["n_examples"] = str(tmp_path / "runs"), 0.01, 30
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(cfg))
    proc = cli("prepare", other)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["lr"] == 0.01
    refused = invoke("registry", "register", run, "-r", tmp_path / "registry")
    assert refused.exit_code == BAD_INPUT and "so every stage matches" in refused.said
    assert not (tmp_path / "registry").exists()


@pytest.fixture
def server(tmp_path, finished):
    with serving(tmp_path / "registry", [finished["good1"]]) as url:
        yield url


def metric(url: str, status: int) -> int:
    return sum(int(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
               if line.startswith('stillroom_requests_total{path="/v1/chat/completions"') and f'status="{status}"' in line)  # fmt: skip


def test_7_a_chunked_upload_is_refused_while_it_streams_and_long_prompts_are_refused(server):
    url = server
    host, port = url.removeprefix("http://").split(":")
    chunk = b"x" * 65536
    planned, sent = 64 * 1024 * 1024, 0  # 64 MiB offered; the cap is 256 KiB
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        try:
            while sent < planned:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:  # the server answered and closed: it stopped reading
            pass
        head = s.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413") and "request body over 262144 bytes" in head, head[:300]
    assert sent < planned
    long = {"model": "production", "messages": [{"role": "user", "content": "hello " * 5000}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=long, timeout=60)
    assert r.status_code == 400 and "over the model's context of 2048 tokens" in r.json()["error"]["message"]
    assert metric(url, 413) == 1 and metric(url, 400) == 1


def test_8_numeric_fields_are_range_checked_and_an_unhandled_error_is_a_counted_json_500(server):
    url = server
    for field, value in (("seed", 2**64), ("seed", -1), ("temperature", 1e-300), ("top_p", 0), ("max_tokens", 10**12), ("n", 3)):
        body = {"model": "production", "messages": [{"role": "user", "content": "hi"}], field: value}
        r = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, r.text)
    assert metric(url, 400) == 6

    # the guard under any server: a handler that fails answers a JSON 500, the connection survives, it is counted
    from fastapi import FastAPI

    from stillroom.http_guard import Guard

    seen = []
    broken = FastAPI()
    broken.add_middleware(Guard, max_body=1024, observe=lambda path, status, headers, s: seen.append((path, status)))

    @broken.get("/health")
    def health():
        return {"ok": True}

    @broken.post("/boom")
    def boom():
        raise RuntimeError("a bug")

    with running(broken) as base, httpx.Client() as c:
        r = c.post(f"{base}/boom", json={})
        assert r.status_code == 500 and "internal error" in r.json()["error"]["message"]
        assert c.post(f"{base}/boom", content=b"x" * 2048).status_code == 413
        assert c.get(f"{base}/health").status_code == 200
    assert ("/boom", 500) in seen and ("/boom", 413) in seen


STAGES_CFG = {
    "student": {"pruned_from": "teacher", "keep_layers": 2},
    "data": {"n_examples": 30, "layer_weights": {"core": 0.3, "failure": 0.7}, "held_out_functions": 2},
    "signals": {"kind": ["sequence"], "n": 1, "max_new_tokens": 8, "batch_size": 8, "shard_size": 8, "top_k": 0},
    "train": {"epochs": 2, "batch_size": 4, "max_length": 128, "checkpoint_every": 1},
}  # fmt: skip


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("hardening-train")
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(dict(STAGES_CFG, run={"name": "a", "dir": str(root / "runs")}, teacher={"model": str(tiny_model_dir)})))
    proc = cli("mix", path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


def test_9_a_truncated_train_checkpoint_says_to_force_train(mixed):
    run = Path(yaml.safe_load(mixed.read_text())["run"]["dir"]) / "a"
    assert cli("train", mixed).returncode == 0
    (state,) = (run / "train").glob(".checkpoint-*/state.safetensors")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    (run / "train" / "manifest.json").unlink()  # what a kill leaves
    around = tree(mixed.parent, skip=run)
    proc = cli("train", mixed)
    assert tree(mixed.parent, skip=run) == around
    assert proc.returncode == BAD_INPUT and "Traceback" not in proc.stderr
    said = " ".join(proc.stderr.split())
    assert "the checkpoint is truncated or damaged" in said and "`stillroom train CONFIG --force train`" in said
    assert cli("train", mixed, "--force", "train").returncode == 0


def test_9_an_unwritable_run_folder_is_a_message(mixed, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the runs should go\n")
    around = (tree(tmp_path), tree(mixed.parent))
    proc = cli("prepare", mixed, f"run.dir={blocker}")
    assert proc.returncode == BAD_INPUT and "cannot write the run" in proc.stderr and "Traceback" not in proc.stderr
    assert (tree(tmp_path), tree(mixed.parent)) == around


def test_10_non_finite_settings_are_refused_and_a_diverging_run_stops_with_a_message(mixed):
    inf = cli("train", mixed, "train.lr=.inf")
    assert inf.returncode == BAD_INPUT and "train.lr: Input should be a finite number" in inf.stderr
    weights = cli("validate", mixed, "data.layer_weights={core: .inf}")
    assert weights.returncode == BAD_INPUT and "data.layer_weights.core" in weights.stderr
    run = Path(yaml.safe_load(mixed.read_text())["run"]["dir"]) / "a"
    around = tree(mixed.parent, skip=run)
    diverged = cli("train", mixed, "train.lr=1e30")
    assert tree(mixed.parent, skip=run) == around
    assert diverged.returncode == BAD_INPUT and "Traceback" not in diverged.stderr
    assert "training diverged: the loss is" in " ".join(diverged.stderr.split())
    assert not (run / "train" / "manifest.json").exists()  # nothing a later stage would trust


def test_11_the_smaller_ones(tmp_path, finished, server):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    assert "the file is empty" in invoke("validate", cfg).said
    cfg.write_text("train:\n  lora:\n    rank: 4\n")
    assert "allowed: r, alpha, dropout, target_modules, save_adapter" in invoke("validate", cfg).said
    cfg.write_text("eval:\n  gates:\n    - {metric: ece, max: 0.1, bound: 2}\n")
    assert "allowed: metric, per, vs, min, max" in invoke("validate", cfg).said
    reg = tmp_path / "failed-only"  # (tmp_path / "registry" is the server's)
    registry.register(reg, finished["bad"])
    blank = invoke("registry", "promote", "v1", "-r", reg, "--force", "--reason", " ")
    assert blank.exit_code == BAD_INPUT and "not blank" in blank.said
    typo = invoke("registry", "list", "-r", tmp_path / "typo")
    assert typo.exit_code == BAD_INPUT and "no registry at" in typo.said and not (tmp_path / "typo").exists()
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": "production", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "streaming is not supported" in r.json()["error"]["message"]
