"""The openai teacher backend against a real HTTP server on loopback, serving a tiny model through
stillroom's own endpoint; middleware in the test makes it fail requests or drop logprobs."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml
from fastapi.responses import JSONResponse, Response
from finished_runs import running

from stillroom import models
from stillroom.examples.toolcall.task import ToolCallTask
from stillroom.openai_server import create_app
from stillroom.teachers import HFTeacher, OpenAITeacher, Sampling, TeacherError


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    model, tokenizer = models.load(str(tiny_model_dir))
    app = create_app(model, tokenizer, "tiny")
    app.state.mode = {"fail_every": 0, "strip_logprobs": False, "count": 0}

    @app.middleware("http")
    async def misbehave(request, call_next):
        mode = app.state.mode
        mode["count"] += 1
        if mode["fail_every"] and mode["count"] % mode["fail_every"] == 0:
            return JSONResponse({"error": "overloaded"}, status_code=503)
        response = await call_next(request)
        if not mode["strip_logprobs"]:
            return response
        body = json.loads(b"".join([chunk async for chunk in response.body_iterator]))
        for choice in body.get("choices", []):
            choice["logprobs"] = None
        return Response(json.dumps(body), status_code=response.status_code, media_type="application/json")

    with running(app) as url:
        yield {"url": f"{url}/v1", "mode": app.state.mode, "model": model, "tokenizer": tokenizer}


@pytest.fixture(autouse=True)
def _reset(server):
    server["mode"].update(fail_every=0, strip_logprobs=False)


def conversations(n=3):
    task = ToolCallTask()
    return [task.teacher_messages(e) for e in task.build_examples(20, {"core": 1.0}, 0, 2)[:n]]


def test_greedy_over_http_matches_the_local_model(server):
    remote = OpenAITeacher(server["url"], "tiny", concurrency=2)
    local = HFTeacher(server["model"], server["tokenizer"], "tiny")
    convs, sampling = conversations(), Sampling(max_new_tokens=8)
    got = remote.complete(convs, sampling, [0, 0, 0], top_k=5)
    want = local.complete(convs, sampling, [0, 0, 0], top_k=5)
    for g, w in zip(got, want):
        n = len(w.token_ids)
        assert g.token_ids == w.token_ids and g.text == w.text and g.prompt_tokens == w.prompt_tokens
        assert g.topk_ids == w.topk_ids[:n]
        assert g.token_logprobs == pytest.approx(w.token_logprobs[:n], abs=1e-5)


def test_seeded_sampling_over_http_is_reproducible(server):
    remote = OpenAITeacher(server["url"], "tiny")
    sampling = Sampling(max_new_tokens=8, sample=True, temperature=0.9, top_p=0.95)
    a = remote.complete(conversations(), sampling, [1, 2, 3], top_k=0)
    b = remote.complete(conversations(), sampling, [1, 2, 3], top_k=0)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_failed_requests_are_retried(server):
    server["mode"]["fail_every"] = 2
    remote = OpenAITeacher(server["url"], "tiny", concurrency=1, max_retries=3, backoff_s=0.01)
    out = remote.complete(conversations(4), Sampling(max_new_tokens=4), [0] * 4, top_k=3)
    assert len(out) == 4 and all(g.topk_ids for g in out)
    assert remote.retries >= 2


def test_missing_logprobs_is_a_clear_error(server):
    server["mode"]["strip_logprobs"] = True
    remote = OpenAITeacher(server["url"], "tiny")
    with pytest.raises(TeacherError, match="returned no logprobs"):
        remote.complete(conversations(1), Sampling(max_new_tokens=4), [0], top_k=3)


def test_client_errors_are_not_retried(server):
    remote = OpenAITeacher(server["url"], "no-such-model", max_retries=3, backoff_s=0.01)
    with pytest.raises(TeacherError, match="404"):
        remote.complete(conversations(1), Sampling(max_new_tokens=4), [0], top_k=0)
    assert remote.retries == 0


def test_generate_stage_reads_a_remote_teacher(server, tmp_path, tiny_model_dir):
    cfg = {
        "run": {"name": "remote", "dir": str(tmp_path / "runs")},
        "teacher": {"backend": "openai", "model": "tiny", "url": server["url"], "concurrency": 2},
        "student": {"model": str(tiny_model_dir)},
        "data": {"n_examples": 12, "held_out_functions": 1},
        "signals": {"n": 2, "max_new_tokens": 6, "top_k": 4, "shard_size": 4},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "stillroom.cli", "generate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = []
    for shard in sorted((tmp_path / "runs" / "remote" / "generate" / "shards").glob("*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    assert rows and all(r["teacher"] == "openai:tiny" for r in rows)
    assert all(len(r["topk_ids"]) == len(r["token_ids"]) and len(r["topk_ids"][0]) == 4 for r in rows)
