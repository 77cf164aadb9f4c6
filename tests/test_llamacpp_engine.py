"""The llamacpp engine (llama-cpp-python, the optional extra ``llamacpp``): the exported GGUF of a tiny
model gives the torch model's next-token distribution, and ``stillroom serve --engine llamacpp`` passes
the same tests as the torch server: a load test with a promotion and a rollback in the middle (zero
failed requests), a request in flight during a swap, malformed requests answered 4xx. The server tests
are the torch server's own functions, collected here again with this module's llamacpp ``server``, and so are
the openai client's tool-call and structured-output tests (``served``): xgrammar masks llama.cpp's logits as it does torch's."""

from __future__ import annotations

import importlib.util

import pytest

from stillroom.engines import llamacpp_available

pytestmark = pytest.mark.skipif(llamacpp_available() is not None, reason=str(llamacpp_available()))

from finished_runs import make_run, serving  # noqa: E402
from test_registry_and_serving import (  # noqa: E402,F401  (collected here against the llamacpp server below)
    test_a_request_in_flight_during_a_swap_finishes_on_its_version,
    test_load_test_with_promotion_and_rollback_loses_no_request,
    test_malformed_requests_get_a_4xx_with_a_message_and_the_server_keeps_serving,
)

if importlib.util.find_spec("xgrammar") and importlib.util.find_spec("openai"):  # the openai client's tests, against llama.cpp
    from test_tools_over_the_wire import (  # noqa: E402,F401
        test_a_tool_request_gets_tool_calls_back_and_a_tool_result_continues_the_conversation,
        test_response_format_json_schema_holds_where_the_free_model_does_not,
        test_tool_choice_none_yields_no_calls_and_strict_tools_only_valid_ones,
        test_unknown_and_unsupported_fields_answer_400_naming_the_field,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("runs")
    return {name: make_run(root, name, seed, True, tiny_model_dir) for name, seed in (("good1", 1), ("good2", 2))}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """The wire tests' server (``test_tools_over_the_wire``) on llama.cpp: the same version exported to q8_0."""
    import openai

    root = tmp_path_factory.mktemp("wire")
    run = make_run(root, "wire", 5, True, tiny_model_dir)
    with serving(root / "registry", [run], engine="llamacpp") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), run


@pytest.fixture
def server(tmp_path, runs):
    import httpx

    reg = tmp_path / "registry"
    with serving(reg, [runs["good1"], runs["good2"]], engine="llamacpp") as url:
        assert httpx.get(f"{url}/health").json()["engine"] == "llamacpp"
        yield url, reg


def test_llamacpp_gives_the_torch_models_next_token_distribution(tmp_path, tiny_model_dir):
    import math

    from test_gguf_export import tiny_llama

    from stillroom import engines, export
    from stillroom.teachers import Sampling

    folder = tiny_llama(tiny_model_dir, tmp_path / "model", tied=True)
    path = export.export_model(folder, tmp_path / "out", ["f16"])["f16"]
    torch_engine, llama_engine = engines.load("torch", folder), engines.load("llamacpp", folder, gguf=path)
    conversation = [{"role": "user", "content": "Which town has postal code 94107? Reply in 3 words."}]
    want, got = (e.complete([conversation], Sampling(4), [0], top_k=5)[0] for e in (torch_engine, llama_engine))
    assert got.prompt_tokens == want.prompt_tokens  # the same tokenizer renders and counts on both
    assert got.topk_ids[0][:3] == want.topk_ids[0][:3]
    assert all(math.isclose(a, b, abs_tol=0.05) for a, b in zip(got.topk_logprobs[0], want.topk_logprobs[0]))
    again = llama_engine.complete([conversation], Sampling(4), [0], top_k=5)[0]  # the cached prefix reused
    assert again.token_ids == got.token_ids and again.token_logprobs == pytest.approx(got.token_logprobs, abs=1e-4)
    sampled = [llama_engine.complete([conversation], Sampling(6, True, 1.0, 0.9), [s], 0)[0].token_ids for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # one stream per seed
    # the file's own tokenizer (what llama.cpp, Ollama or LM Studio use) splits text as the Hugging Face one does
    from stillroom import generation

    text = generation.render(llama_engine.tokenizer, conversation + [{"role": "assistant", "content": "Call get_zip(code=94107) now, café!"}])
    hf_ids = llama_engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert llama_engine.llm.tokenize(text.encode(), add_bos=False, special=True) == hf_ids


def test_eval_measures_teacher_and_students_on_llamacpp(tmp_path, tiny_model_dir):
    """The eval stage with ``eval.engine: llamacpp`` on a tiny run's stage outputs: the teacher, the float
    student (f16) and the quantized student (q8_0) all answered by llama.cpp, on the same examples."""
    import json

    from test_gguf_export import tiny_llama

    from stillroom import atomic
    from stillroom.config import PipelineConfig
    from stillroom.plugins import registry
    from stillroom.rundir import StageContext
    from stillroom.stages import evaluate

    cfg = PipelineConfig.model_validate({
        "teacher": {"model": str(tiny_model_dir), "context": "none"},
        "eval": {"engine": "llamacpp", "max_examples": 3, "max_new_tokens": 6, "latency_requests": 1, "batch_size": 2},
    })  # fmt: skip
    run = tmp_path / "run"
    examples = registry().get("task", "toolcall").build_examples(12, cfg.data.layer_weights, 0, 2)
    atomic.write_jsonl(run / "prepare" / "eval.jsonl", examples)
    tiny_llama(tiny_model_dir, run / "train" / "model", tied=True)
    atomic.write_json(run / "compress" / "recipe.json", {"method": "none"})
    inputs = {name: run / name for name in ("prepare", "train", "compress", "baseline", "adapt", "mix")}
    ctx = StageContext("eval", run / "eval", cfg, inputs, key="test", teacher=cfg.teacher)
    evaluate.run(ctx)
    results = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert set(results) == {"teacher", "student", "student_q8_0"}
    assert all(r["engine"] == "llamacpp" and r["examples"] == 3 and r["weight_mb"] > 0 for r in results.values())
    assert results["student_q8_0"]["weight_mb"] < results["student"]["weight_mb"]
    assert not list(run.rglob("*.gguf"))  # the GGUF files lived in a scratch folder


def test_constraints_hold_on_llamacpp_as_on_torch(tmp_path, tiny_model_dir):
    """The same constraint on both engines: a random model's every finished answer on llama.cpp meets a
    JSON schema and the offered tools' schemas, greedy and sampled, while the free answers never do; a
    free conversation in the same call is unchanged."""
    pytest.importorskip("xgrammar")
    from test_constrained import CONSTRAINTS
    from test_gguf_export import tiny_llama

    from stillroom import constrained, engines, export
    from stillroom.teachers import Sampling

    folder = tiny_llama(tiny_model_dir, tmp_path / "model", tied=True)
    engine = engines.load("llamacpp", folder, gguf=export.export_model(folder, tmp_path / "out", ["f16"])["f16"])
    conversations = [[{"role": "user", "content": f"Request number {i}: set it up."}] for i in range(3)]
    for sampling in (Sampling(64), Sampling(64, True, 0.9, 1.0)):
        free = engine.complete(conversations, sampling, [11, 12, 13], 0)
        for name, c in CONSTRAINTS.items():
            held = engine.complete(conversations, sampling, [11, 12, 13], 0, constraints=[c] * 3)
            assert all(g.finished and constrained.satisfied(c, g.text) for g in held), (name, [g.text for g in held])
            assert not any(constrained.satisfied(c, g.text) for g in free), (name, [g.text for g in free])
        mixed = engine.complete(conversations, sampling, [11, 12, 13], 0, constraints=[None, CONSTRAINTS["json_schema"], None])
        assert [mixed[0].text, mixed[2].text] == [free[0].text, free[2].text]
