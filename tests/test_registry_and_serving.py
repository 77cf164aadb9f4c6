"""Registry (SQLite) and the serving endpoint over real HTTP on loopback: promotion rules, rollback, a
load test with a promotion and a rollback in the middle, and malformed requests."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from finished_runs import make_run, seal, serving

from stillroom import registry
from stillroom.registry import RegistryError


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("runs")
    return {name: make_run(root, name, seed, passed, tiny_model_dir)
            for name, seed, passed in (("good1", 1, True), ("good2", 2, True), ("bad", 3, False))}  # fmt: skip


def test_promotion_rules_rollback_and_history(tmp_path, runs):
    reg = tmp_path / "registry"
    v1, v2, bad = (registry.register(reg, runs[n], actor="ci") for n in ("good1", "good2", "bad"))
    assert [v1["name"], v2["name"], bad["name"]] == ["v1", "v2", "v3"]
    assert v1["teacher"] == "hf:default" and len(v1["config_hash"]) == 64 and v1["gates_passed"]
    assert Path(v1["model_path"]).is_relative_to(reg) and (Path(v1["model_path"]) / "model.safetensors").exists()

    registry.promote(reg, "v1", actor="ana")
    registry.promote(reg, "v2", actor="ana")
    with pytest.raises(RegistryError, match="failed 1 gate"):
        registry.promote(reg, "v3")
    with pytest.raises(RegistryError, match="needs --reason"):
        registry.promote(reg, "v3", force=True)
    assert registry.resolve(reg, "production")["name"] == "v2"  # refusals changed nothing
    registry.promote(reg, "v3", force=True, reason="hotfix for customer X", actor="bo")
    assert registry.resolve(reg, "production")["name"] == "v3"

    assert registry.rollback(reg, actor="bo")["name"] == "v2"
    assert registry.rollback(reg, actor="bo")["name"] == "v1"
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback(reg)
    forced = [e for e in registry.history(reg) if e["forced"]]
    assert len(forced) == 1 and forced[0]["actor"] == "bo" and forced[0]["reason"] == "hotfix for customer X"
    assert forced[0]["from_version"] == "v2" and forced[0]["to_version"] == "v3"
    assert {v["name"]: v["aliases"] for v in registry.versions(reg)}["v1"] == ["production"]
    with pytest.raises(RegistryError, match="no version 'v9'"):
        registry.promote(reg, "v9")


def test_registry_cli_refuses_a_failed_version_with_a_clear_message(tmp_path, runs):
    from typer.testing import CliRunner

    from stillroom.cli import app

    cli = CliRunner()
    reg = str(tmp_path / "reg")
    assert cli.invoke(app, ["registry", "register", str(runs["bad"]), "-r", reg]).exit_code == 0
    refused = cli.invoke(app, ["registry", "promote", "v1", "-r", reg])
    assert refused.exit_code == 2 and "failed 1 gate" in refused.output
    forced = cli.invoke(app, ["registry", "promote", "v1", "-r", reg, "--force", "--reason", "demo"])
    assert forced.exit_code == 0
    assert "FORCED (demo)" in cli.invoke(app, ["registry", "history", "-r", reg]).output


@pytest.fixture
def server(tmp_path, runs):
    reg = tmp_path / "registry"
    with serving(reg, [runs["good1"], runs["good2"]]) as url:
        yield url, reg


def ask(client: httpx.Client, url: str, max_tokens: int = 8) -> httpx.Response:
    return client.post(f"{url}/v1/chat/completions", json={"model": "production", "max_tokens": max_tokens,
                                                             "messages": [{"role": "user", "content": "Which town has postal code 94107?"}]})  # fmt: skip


def wait_for_version(url: str, version: str, timeout: float = 60) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if httpx.get(f"{url}/health").json()["version"] == version:
            return time.time()
        time.sleep(0.01)
    raise AssertionError(f"the server never switched to {version}")


def test_load_test_with_promotion_and_rollback_loses_no_request(server):
    """4 concurrent clients for the whole test; production moves v1 -> v2 -> v1 in the middle. No request
    fails; a request that started before a move is answered by the version it started on; one that
    started after the server reported the switch is answered by the new version."""
    url, reg = server
    results, stop = [], threading.Event()

    def client():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                start = time.time()
                r = ask(c, url)
                results.append((start, time.time(), r.status_code, r.json().get("model"), r.headers.get("x-stillroom-version")))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    promoted_at = time.time()
    registry.promote(reg, "v2")
    switched_at = wait_for_version(url, "v2")
    time.sleep(1.0)
    rollback_at = time.time()
    registry.rollback(reg)
    back_at = wait_for_version(url, "v1")
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=120)

    assert len(results) > 20 and all(r[2] == 200 for r in results), [r for r in results if r[2] != 200][:3]
    assert all(r[3] == r[4] for r in results)  # body and header agree
    for start, _, _, version, _ in results:
        if start < promoted_at or start > back_at:
            assert version == "v1"
        elif switched_at < start < rollback_at:
            assert version == "v2"
        else:
            assert version in ("v1", "v2")
    assert {r[3] for r in results} == {"v1", "v2"}
    assert [s["version"] for s in httpx.get(f"{url}/health").json()["swaps"]] == ["v1", "v2", "v1"]
    text = httpx.get(f"{url}/metrics").text
    assert "stillroom_swaps_total 2" in text and 'status="200"' in text and "stillroom_request_seconds_bucket" in text


def test_a_request_in_flight_during_a_swap_finishes_on_its_version(server):
    url, reg = server
    box = {}

    def long_request():
        with httpx.Client(timeout=120) as c:
            box["response"] = ask(c, url, max_tokens=512)
            box["ended"] = time.time()

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.2)  # the request is being generated
    registry.promote(reg, "v2")
    swapped = wait_for_version(url, "v2")
    t.join(timeout=120)
    assert box["response"].status_code == 200
    assert swapped < box["ended"], "the swap finished after the request: nothing was in flight"
    assert box["response"].json()["model"] == "v1"
    with httpx.Client(timeout=60) as c:
        assert ask(c, url).json()["model"] == "v2"


@pytest.mark.parametrize(
    "content, status, message",
    [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"model": "production", "messages": [{"role": "user", "content": "x" * 300_000}]}).encode(), 413, "over"),
        (json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "unknown model"),
        (json.dumps({"model": "production", "max_tokens": -5, "messages": [{"role": "user", "content": "hi"}]}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "production", "messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": "production", "messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "role"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving(server, content, status, message):
    url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status and message in r.json()["error"]["message"]
    with httpx.Client(timeout=60) as c:
        assert ask(c, url).status_code == 200


def test_a_served_cascade_escalates_to_the_teacher_with_its_context(tmp_path, tiny_model_dir):
    """A version registered with a fitted cascade: threshold above 1 sends every request to the teacher
    (which sees the task's few-shot context: a longer prompt); threshold 0 without the verifier never does."""
    from stillroom.serve import answer, load_slot

    reg = tmp_path / "registry"
    always = make_run(tmp_path, "always", 1, True, tiny_model_dir, {"threshold": 1.01, "signal": "mean_token_prob", "verifier": False})
    never = make_run(tmp_path, "never", 1, True, tiny_model_dir, {"threshold": 0.0, "signal": "min_token_prob", "verifier": False})
    registry.register(reg, always)
    registry.register(reg, never)
    messages = [{"role": "system", "content": "You are a function-calling assistant."}, {"role": "user", "content": "Wake me at 7."}]
    up = answer(load_slot(registry.resolve(reg, "v1")), messages, 4)
    stay = answer(load_slot(registry.resolve(reg, "v2")), messages, 4)
    plain = answer(load_slot(registry.resolve(reg, "v1"), cascade=False), messages, 4)
    assert up.served_by == "teacher" and 0 < up.confidence < 1.01
    assert stay.served_by == "student" and plain.served_by == "student" and plain.confidence is None
    assert up.prompt_tokens > stay.prompt_tokens + 100  # the teacher's rules and worked examples


def test_the_int8_recipe_and_its_smoothing_scales_travel_with_the_version(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import save_file

    from stillroom import models
    from stillroom.serve import load_slot

    run = make_run(tmp_path, "int8", 4, True, tiny_model_dir)
    model, tokenizer = models.load(str(run / "train" / "model"))
    scales = models.smoothing_scales(model, tokenizer, ["Request: weather in Oslo"], alpha=0.5)
    (run / "compress").mkdir(exist_ok=True)
    save_file(scales, str(run / "compress" / "smoothing.safetensors"))
    (run / "compress" / "recipe.json").write_text(json.dumps({"method": "int8_dynamic", "smoothing": {"file": "smoothing.safetensors"}}))
    seal(run)  # compress ran after train: its manifest, and eval's, name these outputs
    version = registry.register(tmp_path / "registry", run)
    assert version["serving"]["quantize"] == "int8_dynamic"
    kept = Path(version["serving"]["smoothing"])
    assert kept.is_relative_to(tmp_path / "registry") and kept.read_bytes() == (run / "compress" / "smoothing.safetensors").read_bytes()
    served = load_slot(version, cascade=False).engine.model
    want, _ = models.load_quantized(str(run / "train" / "model"), "int8_dynamic", smoothing=run / "compress" / "smoothing.safetensors")
    unsmoothed, _ = models.load_quantized(str(run / "train" / "model"), "int8_dynamic")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert models.count_quantized(served) == 2 * 7 + 1
        assert torch.equal(served(ids).logits, want(ids).logits)
        assert not torch.equal(served(ids).logits, unsmoothed(ids).logits)
