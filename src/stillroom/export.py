"""`stillroom export`: a student as GGUF files, the format llama.cpp (and Ollama, LM Studio) serve.

    stillroom export runs/demo                      # -> runs/demo/export/model.{f16,q8_0,q4_0}.gguf
    stillroom export v3 -r registry                 # -> registry/versions/v3/gguf/..., recorded with their sha256

What goes into a file (Llama architecture only; other architectures are refused by name):

1) Weights: SmoothQuant scales, where the student has them, folded into the float weights first
   (``models.apply_smoothing``, the same fold the int8 recipe uses). Each Hugging Face tensor gets its
   GGUF name from gguf-py's name map. q_proj and k_proj rows are reordered per head from Hugging Face's
   rotate-half RoPE layout (first half of a head's dimensions, then the second half) to the
   interleaved pairs llama.cpp rotates (dims 0,1 then 2,3 ...). A tied head is written once, as
   ``token_embd`` (llama.cpp ties when ``output`` is absent); an untied one as ``output``.
2) Types per format: 1-D tensors (norms) stay F32. ``f16``: every matrix F16. ``q8_0``: every matrix
   Q8_0 (blocks of 32 weights, one scale). ``q4_0``: matrices Q4_0, but the embedding and the head Q8_0
   (they hurt most when coarse, as llama.cpp's own quantizer also keeps them finer). A matrix whose rows
   are not a whole number of 32-weight blocks falls back to F16.
3) Metadata: hyperparameters (context, width, layers, heads, KV heads, RoPE base and dimensions, RMS
   epsilon, vocabulary size), the tokenizer (GPT-2-style byte-level BPE: tokens, token types, merges,
   bos/eos/unk/pad ids, the pre-tokenizer named from the tokenizer's own rule) and the chat template.

Files are written atomically (temp file + rename).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from stillroom import atomic

FORMATS = ("f16", "q8_0", "q4_0")
DEFAULT_FORMATS = FORMATS
BLOCK = 32  # weights per Q8_0 / Q4_0 block


class ExportError(ValueError):
    pass


def file_name(fmt: str) -> str:
    return f"model.{fmt}.gguf"


def rope_interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[n_heads * head_dim, in] rows of q_proj / k_proj in Hugging Face's rotate-half order -> llama.cpp's
    interleaved order. Within each head, row i of the first half and row i of the second half form the
    pair RoPE rotates together; llama.cpp wants that pair adjacent (rows 2i, 2i+1)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _ggml_types(fmt: str):
    from gguf import GGMLQuantizationType as T

    matrix = {"f16": T.F16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[fmt]
    edges = T.F16 if fmt == "f16" else T.Q8_0  # embedding and head
    return matrix, edges


def _encode(name: str, w: torch.Tensor, fmt: str) -> tuple[np.ndarray, object]:
    """A tensor as the array GGUFWriter takes and its GGML type."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    a = w.detach().float().cpu().numpy()
    if a.ndim == 1:
        return a.astype(np.float32), T.F32
    matrix, edges = _ggml_types(fmt)
    kind = edges if name in ("token_embd.weight", "output.weight") else matrix
    if kind != T.F16 and a.shape[-1] % BLOCK:
        kind = T.F16  # rows must be whole blocks
    if kind == T.F16:
        return a.astype(np.float16), T.F16
    return quants.quantize(a, kind), kind


def _check_llama(config) -> None:
    if config.model_type != "llama":
        raise ExportError(f"export writes the Llama architecture; this model is {config.model_type!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"RoPE scaling {rope.get('rope_type')!r} is not written to GGUF by this exporter; only plain RoPE")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ExportError("head_dim * num_attention_heads != hidden_size: not a layout llama.cpp's llama graph reads")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def weight_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every weight of a Llama causal LM, q/k permuted, the tied head once."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for hf_name, w in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd when output is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for {hf_name!r} in gguf-py's Llama map")
        if hf_name.endswith("self_attn.q_proj.weight"):
            w = rope_interleave(w, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            w = rope_interleave(w, config.num_key_value_heads)
        elif hf_name.endswith(("self_attn.q_proj.bias", "self_attn.k_proj.bias")):
            heads = config.num_attention_heads if ".q_proj" in hf_name else config.num_key_value_heads
            w = rope_interleave(w[:, None], heads)[:, 0]
        out.append((name, w))
    return out


def pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization rule: plain byte-level (GPT-2's regex)
    is ``gpt-2``; digits split one by one before it is ``smollm`` (SmolLM's own tokenizer.json)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex")) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    raise ExportError(f"pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp name this exporter knows (gpt-2, smollm)")


def tokenizer_fields(tokenizer, n_vocab: int) -> dict:
    """The tokenizer as GGUF metadata: tokens by id, their types, merges, special ids, template."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ExportError("export writes GPT-2-style byte-level BPE tokenizers only")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = {i: a for i, a in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:  # a vocabulary padded past the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in added and added[i].special else
                         gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)  # fmt: skip
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    template = tokenizer.chat_template
    if not template:
        raise ExportError("the tokenizer has no chat template; llama.cpp would not know how to render a conversation")
    return {"pre": pre_tokenizer(spec), "tokens": tokens, "types": types, "merges": merges, "template": template,
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id,
            "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}  # fmt: skip


def write_gguf(model, tokenizer, target: Path, fmt: str, name: str = "stillroom-student") -> Path:
    """One GGUF file of ``model`` (a float Llama causal LM, smoothing already folded) in ``fmt``."""
    import gguf

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    config = model.config
    _check_llama(config)
    tok = tokenizer_fields(tokenizer, config.vocab_size)
    head_dim = config.hidden_size // config.num_attention_heads
    with atomic.atomic_path(target) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_rope_freq_base(_rope_theta(config))
        w.add_rope_dimension_count(head_dim)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_vocab_size(config.vocab_size)
        w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                         "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[fmt])  # fmt: skip
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["types"])
        w.add_token_merges(tok["merges"])
        for kind, tid in (("bos", tok["bos"]), ("eos", tok["eos"]), ("unk", tok["unk"]), ("pad", tok["pad"])):
            if tid is not None:
                getattr(w, f"add_{kind}_token_id")(tid)
        w.add_add_bos_token(False)  # the chat template writes every special token the prompt needs
        w.add_chat_template(tok["template"])
        for gname, tensor in weight_tensors(model):
            array, kind = _encode(gname, tensor, fmt)
            w.add_tensor(gname, array, raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return target


def export_model(model_dir: str | Path, out_dir: Path, formats=DEFAULT_FORMATS, smoothing: str | Path | None = None,
                 name: str = "stillroom-student") -> dict[str, Path]:  # fmt: skip
    """Every format of the float model in ``model_dir`` (SmoothQuant scales in ``smoothing`` folded
    first) into ``out_dir``; returns {format: path}."""
    from stillroom import models

    model, tokenizer = models.load(str(model_dir))
    if smoothing is not None:
        from safetensors.torch import load_file

        models.apply_smoothing(model, load_file(str(smoothing)))
    return {fmt: write_gguf(model, tokenizer, Path(out_dir) / file_name(fmt), fmt, name) for fmt in formats}


def export_run(run_dir: Path, out_dir: Path | None = None, formats=DEFAULT_FORMATS) -> dict[str, Path]:
    """A run folder's student (``train/model``, with ``compress``'s smoothing scales when it has them)."""
    from stillroom.stages.compress import read_recipe

    run_dir = Path(run_dir)
    if not (run_dir / "train" / "model" / "config.json").exists():
        raise ExportError(f"{run_dir}: no train/model (a finished run folder, e.g. runs/demo?)")
    smoothing = read_recipe(run_dir / "compress")[1] if (run_dir / "compress" / "recipe.json").exists() else None
    return export_model(run_dir / "train" / "model", out_dir or run_dir / "export", formats, smoothing, run_dir.name)


def export_version(root: Path, name: str, formats=DEFAULT_FORMATS) -> dict:
    """A registry version's student (its own copy, smoothing scales included) into its folder under
    ``gguf/``, recorded in the registry with the files' sha256. Returns the updated version."""
    import shutil
    import uuid

    from stillroom import registry

    version = registry.resolve(Path(root), name)
    registry.verify(version)
    staging = Path(root) / "versions" / f".staging-{uuid.uuid4().hex}"
    try:
        written = export_model(version["model_path"], staging, formats, (version.get("serving") or {}).get("smoothing"), version["name"])
        return registry.add_gguf(Path(root), version["name"], written)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
