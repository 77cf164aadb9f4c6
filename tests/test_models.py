import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from stillroom import models


def test_evenly_spaced_keeps_first_and_last():
    assert models.evenly_spaced(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert models.evenly_spaced(4, 4) == [0, 1, 2, 3]
    assert models.evenly_spaced(5, 1) == [0]


def test_depth_pruning_copies_the_chosen_layers(tiny_model_dir, tmp_path):
    teacher, tokenizer = models.load(str(tiny_model_dir))
    student, layers = models.prune_depth(teacher, [0, 3])
    assert layers == [0, 3] and student.config.num_hidden_layers == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, tensor in s_state.items():
        src = name.replace("layers.1.", "layers.3.")
        assert torch.equal(tensor, t_state[src]), name
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    models.save(student, tokenizer, tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student", use_safetensors=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(reloaded(ids).logits, student(ids).logits, atol=1e-6)


def test_mlp_channel_importance_matches_a_naive_reference(tiny_model_dir):
    model, tokenizer = models.load(str(tiny_model_dir))
    texts = ["a short one", "a somewhat longer text that pads the other rows of its batch", "x"]
    got = models.mlp_channel_importance(model, tokenizer, texts, batch_size=2)
    want = [torch.zeros(model.config.intermediate_size, dtype=torch.float64) for _ in model.model.layers]
    count = 0
    for text in texts:  # one text at a time: no padding to mask
        seen = {}
        handles = [layer.mlp.down_proj.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0][0]))
                   for i, layer in enumerate(model.model.layers)]  # fmt: skip
        with torch.no_grad():
            model(**tokenizer(text, return_tensors="pt"))
        for h in handles:
            h.remove()
        for i, x in seen.items():
            want[i] += x.abs().double().sum(0)
        count += x.shape[0]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.allclose(g, (w / count).float(), rtol=1e-4, atol=1e-6)


def test_width_pruning_computes_the_original_with_the_dropped_channels_zeroed(tiny_model_dir, tmp_path):
    model, tokenizer = models.load(str(tiny_model_dir))
    width = model.config.intermediate_size
    importance = [torch.rand(width, generator=torch.Generator().manual_seed(i)) for i in range(len(model.model.layers))]
    pruned, kept = models.prune_width(model, 24, importance)
    assert pruned.config.intermediate_size == 24 and pruned.config.num_hidden_layers == model.config.num_hidden_layers
    assert kept[1] == sorted(torch.argsort(importance[1], descending=True)[:24].tolist())
    assert models.n_params(pruned) == models.n_params(model) - 3 * model.config.hidden_size * (width - 24) * len(kept)
    masked = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    with torch.no_grad():
        for layer, keep in zip(masked.model.layers, kept):
            drop = torch.ones(width, dtype=torch.bool)
            drop[keep] = False
            layer.mlp.down_proj.weight[:, drop] = 0.0
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(pruned(ids).logits, masked(ids).logits, atol=1e-5)
        assert not torch.allclose(pruned(ids).logits, model(ids).logits, atol=1e-3)  # the dropped channels mattered
    models.save(pruned, tokenizer, tmp_path / "narrow")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow", use_safetensors=True)
    assert torch.allclose(reloaded(ids).logits, pruned(ids).logits, atol=1e-6)
    with pytest.raises(ValueError, match="cannot keep 65 of 64"):
        models.prune_width(model, 65, importance)


def test_default_teacher_loads_from_the_installed_gguf_and_is_cached():
    folder = models.default_model_dir()
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert models.default_model_dir() == folder  # second call reads the cache
    model, tokenizer = models.load("default")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert 130e6 < models.n_params(model) < 140e6
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "4" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_set_dropout_reaches_every_attention_module(tiny_model_dir):
    from stillroom.stages.train import set_dropout

    model, _ = models.load(str(tiny_model_dir))
    set_dropout(model, 0.25)
    attention = [m for m in model.modules() if hasattr(m, "attention_dropout")]
    assert len(attention) == model.config.num_hidden_layers
    assert all(m.attention_dropout == 0.25 for m in attention) and model.config.attention_dropout == 0.25


def _down_proj_error(model, quantized, ids) -> float:
    """Relative error of the last layer's down_proj output, int8 against float, on the same inputs."""
    seen = {}
    for name, m in (("float", model), ("int8", quantized)):
        h = m.model.layers[-1].mlp.down_proj.register_forward_hook(lambda mod, a, out, name=name: seen.__setitem__(name, out))
        m(ids)
        h.remove()
    return ((seen["int8"] - seen["float"]).norm() / seen["float"].norm()).item()


def test_smoothing_keeps_the_function_and_shrinks_the_int8_error(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from stillroom.stages.compress import logit_errors

    model, tokenizer = models.load(str(tiny_model_dir))
    with torch.no_grad():  # plant what real LLMs have: a few down_proj input channels far larger than the rest
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[:2] *= 40.0
    models.save(model, tokenizer, tmp_path / "outliers")
    texts = ["Tools: get_weather(city). Request: weather in Oslo", "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>"]
    scales = models.smoothing_scales(model, tokenizer, texts, alpha=0.5)
    assert set(scales) == {f"layers.{i}.down_proj" for i in range(4)} and all(s.shape == (64,) for s in scales.values())
    save_file(scales, str(tmp_path / "s.safetensors"))

    ids = tokenizer(texts[0], return_tensors="pt")["input_ids"]
    smoothed, _ = models.load_quantized(str(tmp_path / "outliers"), "none", smoothing=tmp_path / "s.safetensors")
    with torch.no_grad():
        assert torch.allclose(smoothed(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)  # the same function in float
        plain, _ = models.load_quantized(str(tmp_path / "outliers"), "int8_dynamic")
        both, _ = models.load_quantized(str(tmp_path / "outliers"), "int8_dynamic", smoothing=tmp_path / "s.safetensors")
        assert models.count_quantized(both) == models.count_quantized(plain) == 4 * 7 + 1
        assert _down_proj_error(model, both, ids) < 0.7 * _down_proj_error(model, plain, ids)  # measured: 0.052 against 0.093
        errors = logit_errors(model, {"both": both, "plain": plain}, tokenizer, texts)
        assert errors["both"] < errors["plain"]
    wrong = {k: v for k, v in scales.items() if k != "layers.3.down_proj"}
    with pytest.raises(ValueError, match="do not fit"):
        models.apply_smoothing(model, wrong)


def test_smoothing_at_every_site_keeps_the_function_and_beats_the_mlp_down_alone(tiny_model_dir, tmp_path):
    """Outlier channels in the norms' outputs (what q/k/v and gate/up read) are out of reach of the
    down_proj smoothing alone; folded into the RMSNorm weights, the scales of ``attn_in`` and ``mlp_in``
    move them into the projections' weight columns."""
    from stillroom.stages.compress import logit_errors

    model, tokenizer = models.load(str(tiny_model_dir))
    with torch.no_grad():  # plant outliers in every site's input
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[:2] *= 40.0
            layer.input_layernorm.weight[:3] *= 30.0
            layer.post_attention_layernorm.weight[-3:] *= 30.0
    texts = ["Tools: get_weather(city). Request: weather in Oslo", "<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>"]
    sites = ("down_proj", "attn_in", "mlp_in")
    scales = models.smoothing_scales(model, tokenizer, texts, 0.5, sites)
    hidden, inner = model.config.hidden_size, model.config.intermediate_size
    assert set(scales) == {f"layers.{i}.{s}" for i in range(4) for s in sites}
    assert all(v.shape == ((inner,) if k.endswith("down_proj") else (hidden,)) for k, v in scales.items())
    ids = tokenizer(texts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        folded = models.apply_smoothing(copy.deepcopy(model), scales)
        assert torch.allclose(folded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)  # the same function in float
        down = models.apply_smoothing(copy.deepcopy(model), models.smoothing_scales(model, tokenizer, texts, 0.5))
        errors = logit_errors(model, {"every_site": models.quantize(folded, "int8_dynamic"),
                                      "down_proj": models.quantize(down, "int8_dynamic")}, tokenizer, texts)  # fmt: skip
    assert errors["every_site"] < errors["down_proj"]
    with pytest.raises(ValueError, match="do not fit"):
        models.apply_smoothing(model, {k: v for k, v in scales.items() if k != "layers.2.attn_in"})
    with pytest.raises(ValueError, match="unknown smoothing site"):
        models.smoothing_scales(model, tokenizer, texts, 0.5, ("o_proj",))
