"""Training-step throughput of the demo student: SFT-only, offline KD and online KD, in one run.

    python benchmarks/train_step.py [--batch 8] [--prompt 192] [--completion 64] [--steps 4]

The student is the demo's: 10 layers pruned from SmolLM2-135M-Instruct. Each step is the stage's own
objective (stages/train.py: ``completion_loss``) forward + backward + AdamW step on a batch of
prompt + completion rows; the loss covers the completion tokens. Variants:

- ``hf_logits_sft``: the plain Hugging Face path (``model(..., labels=...)``, full logits), the baseline;
- ``sft``: stillroom's chunked objective, cross-entropy only;
- ``offline_kd``: + forward KL to a stored top-32 per completion token (no teacher forward);
- ``online_kd``: + forward KL to the dense teacher, whose forward runs in the step over its own prompt
  (the few-shot context makes it ``--teacher-context`` tokens longer).

Prints JSON: tokens/s (student input tokens) per variant and the ratio to ``hf_logits_sft``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=192)
    ap.add_argument("--completion", type=int, default=64)
    ap.add_argument("--teacher-context", type=int, default=520)
    ap.add_argument("--keep-layers", type=int, default=10)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=32)
    args = ap.parse_args()

    from stillroom import models
    from stillroom.stages.train import completion_loss, teacher_targets

    teacher, _ = models.load("default")
    student, layers = models.prune_depth(teacher, args.keep_layers)
    teacher.eval().requires_grad_(False)
    vocab = teacher.config.vocab_size
    g = torch.Generator().manual_seed(0)
    b, p, c = args.batch, args.prompt, args.completion
    ids = torch.randint(0, vocab, (b, p + c), generator=g)
    labels = ids.clone()
    labels[:, :p] = -100
    t_ids = torch.cat([torch.randint(0, vocab, (b, args.teacher_context), generator=g), ids], 1)
    t_labels = torch.cat([torch.full((b, args.teacher_context), -100), labels], 1)
    topk = torch.log_softmax(torch.randn(b, p + c, vocab, generator=g), -1).topk(args.top_k, -1)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "weights": torch.ones(b),
             "layer_weights": torch.ones(b), "kd_ids": topk.indices, "kd_logprobs": topk.values,
             "kd_mask": labels != -100, "teacher_input_ids": t_ids, "teacher_labels": t_labels,
             "teacher_attention_mask": torch.ones_like(t_ids)}  # fmt: skip
    del topk
    head = models.decoder_and_head(teacher)

    def step_fn(variant):
        if variant == "hf_logits_sft":
            return student(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels).loss
        if variant == "sft":
            return completion_loss(student, batch)
        if variant == "offline_kd":
            return completion_loss(student, batch, kd_weight=1.0)
        return completion_loss(student, batch, teacher_targets(head, batch), kd_weight=1.0)

    opt = torch.optim.AdamW([q for q in student.parameters() if q.requires_grad], lr=1e-5)
    results = {}
    for variant in ("hf_logits_sft", "sft", "offline_kd", "online_kd"):
        times = []
        for i in range(args.steps + 1):  # the first step warms up allocators and is not counted
            t0 = time.perf_counter()
            step_fn(variant).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i:
                times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        results[variant] = {"step_seconds_median": round(sec, 3), "tokens_per_s": round(b * (p + c) / sec, 1)}
    base = results["hf_logits_sft"]["tokens_per_s"]
    for r in results.values():
        r["vs_hf_logits_sft"] = round(r["tokens_per_s"] / base, 3)
    print(json.dumps({"benchmark": "train_step", "student_layers": layers, "batch": b, "prompt_tokens": p,
                      "completion_tokens": c, "teacher_context_tokens": args.teacher_context, "steps": args.steps,
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
