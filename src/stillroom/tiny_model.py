"""A tiny random Llama with the default teacher's tokenizer, for a smoke run of the whole loop in
minutes (its answers are noise; the stages, files and report are real).

    python -m stillroom.tiny_model tiny   # writes the folder `tiny`; then e.g. stillroom init DATA --teacher tiny
"""

from __future__ import annotations

import sys
from pathlib import Path


def build(folder: str | Path, layers: int = 4, seed: int = 0) -> Path:
    """Write a 4-layer, 32-wide Llama (about 1.6M parameters) and the SmolLM2 tokenizer to ``folder``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from stillroom.models import default_gguf

    gguf = default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return Path(folder)


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "tiny"))
