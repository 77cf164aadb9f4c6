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
