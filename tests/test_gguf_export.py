"""GGUF export: a tiny Llama (built here, untied and tied head, with SmoothQuant scales) written as GGUF and
read back by transformers' GGUF loader, logits compared with the float model's; the registry records the
files and refuses a changed one; the CLI on a run folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stillroom import export, models, registry
from stillroom.registry import RegistryError

# Tolerances on max |logit difference| / max |logit|. Against the same model with its weights rounded to f16
# the file must agree to float32 arithmetic (the exporter's own mistakes show here); against the float model
# f16 rounding (~5e-4 relative per weight) adds up over the layers: 2.4e-3 measured on this model.
EXACT_TOLERANCE = 1e-4
F16_TOLERANCE = 1e-2


def tiny_llama(tokenizer_dir: Path, folder: Path, tied: bool, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=tied, rope_theta=50000.0, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init at std 0.02 leaves logits near zero; larger weights make the comparison bite
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(10)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def logits_of(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits.float()


def read_back(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


TEXT = "<|im_start|>user\nWhich town has postal code 94107? Call get_weather(city='Paris').<|im_end|>\n<|im_start|>assistant\n"


def test_rope_interleave_pairs_rotate_half_partners():
    w = torch.arange(2 * 8)[:, None].float()  # 2 heads of dim 8, row index as value
    out = export.rope_interleave(w, 2)[:, 0].tolist()
    assert out == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("tied", [True, False])
def test_f16_round_trip_matches_the_float_model(tmp_path, tiny_model_dir, tied):
    folder = tiny_llama(tiny_model_dir, tmp_path / "model", tied)
    model, tokenizer = models.load(str(folder))
    want = logits_of(model, tokenizer, TEXT)
    path = export.export_model(folder, tmp_path / "out", ["f16"])["f16"]
    back = read_back(path)
    got = logits_of(back, tokenizer, TEXT)
    assert back.config.tie_word_embeddings == tied and back.config.num_hidden_layers == 2
    error = (got - want).abs().max() / want.abs().max()
    assert error < F16_TOLERANCE, f"f16 round trip: max-abs logit error {error:.2e} of the largest logit"
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    with torch.no_grad():  # the float model with f16-rounded weights: what the file holds, exactly
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    rounded = logits_of(model, tokenizer, TEXT)
    exact = (got - rounded).abs().max() / rounded.abs().max()
    assert exact < EXACT_TOLERANCE, f"f16 file vs f16-rounded weights: {exact:.2e}"


def test_quantized_files_hold_exactly_the_quantized_weights_and_tokenizer_metadata(tmp_path, tiny_model_dir):
    import copy

    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, quants

    folder = tiny_llama(tiny_model_dir, tmp_path / "model", tied=True)
    model, tokenizer = models.load(str(folder))
    written = export.export_model(folder, tmp_path / "out", ["q8_0", "q4_0"])
    for fmt, kind in (("q8_0", T.Q8_0), ("q4_0", T.Q4_0)):
        reference = copy.deepcopy(model)  # each matrix through the format's own round trip (the embedding stays Q8_0)
        with torch.no_grad():
            for name, p in reference.named_parameters():
                if p.ndim == 2:
                    k = T.Q8_0 if "embed_tokens" in name else kind
                    p.copy_(torch.from_numpy(quants.dequantize(quants.quantize(p.numpy(), k), k)))
        want, got = logits_of(reference, tokenizer, TEXT), logits_of(read_back(written[fmt]), tokenizer, TEXT)
        assert float((got - want).abs().max() / want.abs().max()) < EXACT_TOLERANCE, fmt
    r = GGUFReader(written["q8_0"])
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2 and fields["llama.rope.freq_base"] == 50000.0
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # the student's tokenizer: plain byte-level BPE
    assert r.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert len(r.fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    assert "<|im_start|>" in r.fields["tokenizer.chat_template"].contents()
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32" and "output.weight" not in types


def test_smoothing_scales_are_folded_before_export(tmp_path, tiny_model_dir):
    from safetensors.torch import save_file

    folder = tiny_llama(tiny_model_dir, tmp_path / "model", tied=True)
    model, tokenizer = models.load(str(folder))
    want = logits_of(model, tokenizer, TEXT)
    scales = {f"layers.{i}.down_proj": torch.rand(128) * 4 + 0.25 for i in range(2)}
    save_file(scales, str(tmp_path / "smoothing.safetensors"))
    path = export.export_model(folder, tmp_path / "out", ["f16"], smoothing=tmp_path / "smoothing.safetensors")["f16"]
    back = read_back(path)
    assert (got := logits_of(back, tokenizer, TEXT)).argmax(-1).tolist() == want.argmax(-1).tolist()
    assert float((got - want).abs().max() / want.abs().max()) < F16_TOLERANCE * 4  # the same function, rounded differently
    up = back.model.layers[0].mlp.up_proj.weight
    assert not torch.allclose(up, model.model.layers[0].mlp.up_proj.weight, atol=1e-2)  # the fold happened


def test_registry_records_exported_files_and_refuses_a_changed_one(tmp_path, tiny_model_dir):
    from finished_runs import make_run

    run = make_run(tmp_path / "runs", "good", 1, True, tiny_model_dir)
    reg = tmp_path / "registry"
    registry.register(reg, run)
    v = export.export_version(reg, "v1", ["f16", "q8_0"])
    assert set(v["serving"]["gguf"]) == {"f16", "q8_0"} and "gguf/model.q8_0.gguf" in v["files"]
    path = registry.gguf_file(v, "q8_0")
    assert path.exists() and not list((reg / "versions").glob(".staging-*"))
    registry.promote(reg, "v1")  # verify passes with the exported files
    assert any(e["action"] == "export" for e in registry.history(reg))
    with pytest.raises(RegistryError, match="no q4_0 GGUF"):
        registry.gguf_file(v, "q4_0")
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(RegistryError, match="gguf/model.q8_0.gguf"):
        registry.verify(registry.resolve(reg, "v1"))


def test_cli_exports_a_run_folder(tmp_path, tiny_model_dir):
    from finished_runs import make_run
    from typer.testing import CliRunner

    from stillroom.cli import app

    run = make_run(tmp_path / "runs", "good", 1, True, tiny_model_dir)
    result = CliRunner().invoke(app, ["export", str(run), "--format", "q8_0"])
    assert result.exit_code == 0, result.output
    assert (run / "export" / "model.q8_0.gguf").exists() and not (run / "export" / "model.f16.gguf").exists()
    bad = CliRunner().invoke(app, ["export", str(run), "--format", "q3_k"])
    assert bad.exit_code == 2 and "q3_k" in bad.output
