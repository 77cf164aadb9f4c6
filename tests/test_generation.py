from stillroom import generation, models
from stillroom.examples.toolcall.task import ToolCallTask


def prompts(tokenizer, n=5):
    task = ToolCallTask()
    examples = task.build_examples(40, {"core": 1.0}, 0, 2)[:n]
    return [generation.render(tokenizer, task.teacher_messages(e)) for e in examples]


def test_prefix_cache_gives_the_same_tokens_as_full_prompts(tiny_model_dir):
    model, tokenizer = models.load(str(tiny_model_dir))
    ps = prompts(tokenizer)
    plain = generation.generate(model, tokenizer, ps, max_new_tokens=10)
    cache = generation.PrefixCache()
    cached = generation.generate(model, tokenizer, ps, max_new_tokens=10, prefix_cache=cache)
    again = generation.generate(model, tokenizer, ps[1:3], max_new_tokens=10, prefix_cache=cache)
    one_by_one = [generation.generate(model, tokenizer, [p], max_new_tokens=10)[0] for p in ps]
    assert [g.token_ids for g in cached] == [g.token_ids for g in plain] == [g.token_ids for g in one_by_one]
    assert [g.token_ids for g in again] == [g.token_ids for g in cached[1:3]]
    assert (cache.misses, cache.hits) == (1, 1)
    assert [g.prompt_tokens for g in cached] == [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in ps]


def test_sampling_is_reproducible_by_seed(tiny_model_dir):
    model, tokenizer = models.load(str(tiny_model_dir))
    ps = prompts(tokenizer, 3)
    kw = dict(max_new_tokens=8, sample=True, temperature=1.0, top_p=0.95)
    a = generation.generate(model, tokenizer, ps, seeds=[7, 8, 9], **kw)
    b = generation.generate(model, tokenizer, ps, seeds=[7, 8, 9], prefix_cache=generation.PrefixCache(), **kw)
    c = generation.generate(model, tokenizer, ps, seeds=[17, 18, 19], **kw)
    alone = generation.generate(model, tokenizer, ps[1:2], seeds=[8], **kw)  # batch-independent
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    assert alone[0].token_ids == a[1].token_ids


def test_shared_prefix_stops_at_a_turn_boundary():
    eot = 2
    rows = [[5, 6, eot, 9, 7, 1, 1], [5, 6, eot, 9, 7, 1, 2], [5, 6, eot, 9, 7, 3]]
    assert generation.shared_prefix_length(rows, eot) == 4  # after eot and the newline token
    assert generation.shared_prefix_length([[5, 6, 7], [5, 6, 8]], eot) == 0  # no whole turn shared
    assert generation.shared_prefix_length([[5, eot], [5, eot]], eot) == 1  # a row keeps one token


def test_topk_captured_during_generation_matches_teacher_forced_scoring(tiny_model_dir):
    import torch

    model, tokenizer = models.load(str(tiny_model_dir))
    ps = prompts(tokenizer, 3)
    for sample in (False, True):
        gen = generation.generate(
            model, tokenizer, ps, max_new_tokens=6, top_k=5, sample=sample, temperature=0.5, top_p=0.9,
            seeds=[1, 2, 3], prefix_cache=generation.PrefixCache(),
        )  # fmt: skip
        scored = generation.score(model, tokenizer, ps, [g.token_ids for g in gen], top_k=5)
        for g, s in zip(gen, scored):
            n = len(g.token_ids)
            assert len(g.topk_ids) == n + int(g.finished) and len(g.topk_ids[0]) == 5
            assert g.topk_ids[:n] == s.topk_ids[:n]
            assert torch.allclose(torch.tensor(g.topk_logprobs[:n]), torch.tensor(s.topk_logprobs[:n]), atol=1e-4)
            # untempered: the emitted token's log-prob is from the raw distribution
            assert torch.allclose(torch.tensor(g.token_logprobs[:n]), torch.tensor(s.token_logprobs[:n]), atol=1e-4)
            assert all(a >= b for a, b in zip(g.topk_logprobs[0], g.topk_logprobs[0][1:]))
            if not sample:  # greedy emits the top-1 token
                assert [row[0] for row in g.topk_ids[:n]] == g.token_ids
