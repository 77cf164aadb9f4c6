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
    a = generation.generate(model, tokenizer, ps, seed=7, **kw)
    b = generation.generate(model, tokenizer, ps, seed=7, prefix_cache=generation.PrefixCache(), **kw)
    c = generation.generate(model, tokenizer, ps, seed=8, **kw)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_shared_prefix_stops_at_a_turn_boundary():
    eot = 2
    rows = [[5, 6, eot, 9, 7, 1, 1], [5, 6, eot, 9, 7, 1, 2], [5, 6, eot, 9, 7, 3]]
    assert generation.shared_prefix_length(rows, eot) == 4  # after eot and the newline token
    assert generation.shared_prefix_length([[5, 6, 7], [5, 6, 8]], eot) == 0  # no whole turn shared
    assert generation.shared_prefix_length([[5, eot], [5, eot]], eot) == 1  # a row keeps one token
