"""Teacher-signal benchmark on the default teacher with the tool-call example's few-shot context.

Prints JSON with, measured in the same run:
- generation tokens/s: stillroom's batched generation with the shared-prefix KV cache (and top-k
  capture on) vs plain `model.generate` one prompt at a time, plus how many completions agree;
- store bytes per token (Parquet, top-k ids + fp16 log-probs) vs dense fp16 logits;
- the cost of truncating the teacher's distribution to its top k (k = 8, 32, 128) on real teacher
  outputs: the probability mass kept, KL(renormalized top-k || full) = -log(mass kept), and
  KL(full || top-k with the tail mass spread uniformly over the other tokens).

    .venv/bin/python benchmarks/signals.py [--prompts 16] [--max-new-tokens 40] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stillroom import generation, models
from stillroom.examples.toolcall.task import ToolCallTask
from stillroom.stages.generate import record, schema


def plain_one_at_a_time(model, tokenizer, prompts, max_new_tokens):
    eot = generation.end_of_turn_id(tokenizer)
    out, tokens = [], 0
    t0 = time.perf_counter()
    for p in prompts:
        enc = tokenizer(p, return_tensors="pt", add_special_tokens=False)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot, pad_token_id=eot)
        new = ids[0, enc["input_ids"].shape[1] :].tolist()
        new = new[: new.index(eot)] if eot in new else new
        out.append(new)
        tokens += len(new)
    return out, tokens / (time.perf_counter() - t0)


def ours_batched(model, tokenizer, prompts, max_new_tokens, batch_size, top_k):
    cache, out = generation.PrefixCache(), []
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        out += generation.generate(model, tokenizer, prompts[i : i + batch_size], max_new_tokens=max_new_tokens, top_k=top_k, prefix_cache=cache)
    return out, sum(len(g.token_ids) for g in out) / (time.perf_counter() - t0)


def store_bytes_per_token(results, vocab_size: int) -> float:
    rows = [record(f"x{i}", 0, "default", g, greedy=True, temperature=0.0, top_p=1.0, seed=0) for i, g in enumerate(results)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "shard.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema(vocab_size)), path)
        size = path.stat().st_size
    return size / sum(len(g.topk_ids) for g in results)


@torch.inference_mode()
def truncation_cost(model, tokenizer, prompts, completions, ks=(8, 32, 128)) -> dict:
    """Teacher-forced full distributions at every completion position, against their top-k."""
    eot = generation.end_of_turn_id(tokenizer)
    stats = {k: {"mass": [], "kl_renorm": [], "kl_uniform_tail": []} for k in ks}
    for p, c in zip(prompts, completions):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + c + [eot]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p_ids) - 1 : -1].float(), -1)  # [T, V]
        probs, vocab = logp.exp(), logp.shape[-1]
        for k in ks:
            top = logp.topk(k, -1)
            mass = top.values.exp().sum(-1).clamp(max=1.0)  # [T]
            tail_lp = torch.log(((1 - mass) / (vocab - k)).clamp_min(1e-30))  # each tail token's share
            q = tail_lp[:, None].expand_as(logp).clone().scatter(-1, top.indices, top.values)
            stats[k]["mass"] += mass.tolist()
            stats[k]["kl_renorm"] += (-mass.log()).tolist()
            stats[k]["kl_uniform_tail"] += (probs * (logp - q)).sum(-1).tolist()
    return {f"k{k}": {name: round(sum(v) / len(v), 6) for name, v in s.items()} for k, s in stats.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    task = ToolCallTask()
    model, tokenizer = models.load("default")
    examples = [e for e in task.build_examples(400, {"core": 0.5, "failure": 0.25, "long_tail": 0.25}, 0, 6)][: args.prompts]
    prompts = [generation.render(tokenizer, task.teacher_messages(e)) for e in examples]

    plain, plain_tps = plain_one_at_a_time(model, tokenizer, prompts, args.max_new_tokens)
    ours, ours_tps = ours_batched(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, args.top_k)
    per_token = store_bytes_per_token(ours, len(tokenizer))
    dense = len(tokenizer) * 2  # fp16 logits over the whole vocabulary
    report = {
        "teacher": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
        "torch_threads": torch.get_num_threads(),
        "prompts": len(prompts),
        "mean_prompt_tokens": round(sum(g.prompt_tokens for g in ours) / len(ours), 1),
        "max_new_tokens": args.max_new_tokens,
        "generation": {
            "plain_generate_one_at_a_time_tokens_per_s": round(plain_tps, 2),
            "stillroom_batched_prefix_cache_topk_tokens_per_s": round(ours_tps, 2),
            "speedup": round(ours_tps / plain_tps, 2),
            "batch_size": args.batch_size,
            "identical_completions": sum(a == g.token_ids for a, g in zip(plain, ours)),
        },
        "store": {
            "top_k": args.top_k,
            "bytes_per_token": round(per_token, 1),
            "dense_fp16_bytes_per_token": dense,
            "fraction_of_dense": round(per_token / dense, 6),
            "dense_over_store": round(dense / per_token, 1),
        },
        "truncation": truncation_cost(model, tokenizer, prompts, [g.token_ids for g in ours]),
    }
    print(json.dumps(report, indent=2))
    if not math.isfinite(report["generation"]["speedup"]):
        raise SystemExit("no tokens generated")


if __name__ == "__main__":
    main()
