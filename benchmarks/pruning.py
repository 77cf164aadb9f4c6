"""How much of the teacher a pruned student keeps, before any training and after a short heal.

    python benchmarks/pruning.py [--keep 10 15 20] [--examples 48] [--teacher runs/demo/adapt/model] [--heal-steps 0] [--speed-prompts 0]

For each layer count, students pruned from the demo teacher in several ways: by depth (evenly spaced,
by measured importance, the first layers plus the last), and at the same parameter budget by width
(every layer, each MLP keeping its most active channels: ``models.prune_width``) and by both (half the
dropped layers, the rest of the budget taken from the MLPs' width); widths are multiples of 32 (GGUF
blocks) and never above the depth student's parameter count. The teacher itself is scored with and
without its few-shot context: the cross-entropy (nats per token) of the clean reference answers of dev
and train examples, teacher-forced behind the student's context-free prompt. Lower is better; the
teacher without its context is the baseline a student starts from at best, the teacher with it the
level the distillation aims at. Importance scores (layers: ``models.layer_importance``, channels:
``models.mlp_channel_importance``) are measured on other training examples than the ones scored.
With ``--heal-steps N``, each student is also trained N AdamW steps (8 rows, lr 3e-4, the loss on the
reference answer only) on further training examples, the same rows in the same order for every
student, and scored again: pruning losses right after the cut do not rank students the way training
does (Minitron), so the healed figure is the one to choose by. With ``--speed-prompts N``, each student
and the teacher (timed again right before each student) decode N prompts greedily one at a time, 32
tokens each, best of 3 passes: what a request costs depends on the layer count as much as on the
parameters. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def reference_ce(model, tokenizer, examples, messages_of) -> float:
    from stillroom import generation

    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            prompt = tokenizer(generation.render(tokenizer, messages_of(e)), add_special_tokens=False)["input_ids"]
            target = tokenizer(e["reference"], add_special_tokens=False)["input_ids"]
            logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum").item()
            count += len(target)
    return round(total / count, 3)


def heal(model, tokenizer, examples, messages_of, steps: int, batch: int = 8, lr: float = 3e-4) -> list[float]:
    """``steps`` AdamW steps of SFT on the reference answers, rows encoded and padded as the train stage
    does (prompt tokens masked, end of turn appended); returns the losses."""
    from stillroom import generation
    from stillroom.stages.train import collate, encode

    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses = []
    for step in range(steps):
        rows = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        b = collate([encode(tokenizer, generation.render(tokenizer, messages_of(e)), e["reference"], 10**6, 1.0) for e in rows], pad)
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def ms_per_token(model, tokenizer, examples, messages_of, new_tokens: int = 32, repeats: int = 3) -> float:
    """Greedy decoding one request at a time, exactly ``new_tokens`` tokens each (no early stop), prefill
    included: the best of ``repeats`` passes over ``examples``, in ms per generated token."""
    from stillroom import generation

    prompts = [tokenizer(generation.render(tokenizer, messages_of(e)), return_tensors="pt") for e in examples]
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            for enc in prompts:
                model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tokenizer.eos_token_id)  # fmt: skip
            best = min(best, time.perf_counter() - t)
    return round(1000 * best / (new_tokens * len(prompts)), 2)


def params_with(teacher, layers: int, width: int) -> int:
    """Parameters of a student with ``layers`` of the teacher's layers, each MLP ``width`` channels wide."""
    from stillroom import models

    per_layer = models.n_params(teacher.get_decoder().layers[0])
    per_channel = 3 * teacher.config.hidden_size  # a row of gate_proj and up_proj, a column of down_proj
    dropped = teacher.config.num_hidden_layers - layers
    return models.n_params(teacher) - dropped * per_layer - layers * per_channel * (teacher.config.intermediate_size - width)


def width_for(teacher, layers: int, budget: int) -> int:
    """The widest MLP (a multiple of 32) a ``layers``-layer student fits in ``budget`` parameters."""
    full = teacher.config.intermediate_size
    over = params_with(teacher, layers, full) - budget
    width = full - -(-over // (3 * teacher.config.hidden_size * layers))
    return max(32, min(width, full) // 32 * 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=int, nargs="+", default=[10, 15, 20], help="layer counts to compare")
    ap.add_argument("--examples", type=int, default=48, help="reference answers scored")
    ap.add_argument("--importance-samples", type=int, default=32, help="training texts the importance is measured on")
    ap.add_argument("--heal-steps", type=int, default=0, help="train each student this many steps, then score again")
    ap.add_argument("--speed-prompts", type=int, default=0, help="also time greedy decoding (ms per token, batch 1) on this many prompts")
    ap.add_argument("--ways", nargs="+", default=["evenly_spaced", "importance", "first_and_last", "width", "depth_and_width"])
    ap.add_argument("--teacher", default="default", help="the teacher to prune: `default` (as shipped) or a folder, e.g. the demo's corrected teacher runs/demo/adapt/model")
    args = ap.parse_args()

    from stillroom import generation, models
    from stillroom.examples.toolcall.task import ToolCallTask
    from stillroom.stages.prepare import split_for

    torch.manual_seed(0)
    task = ToolCallTask()
    examples = [e for e in task.build_examples(400, {"core": 0.5, "failure": 0.25, "long_tail": 0.25}, 0, 6)
                if split_for(e, 0.2, 0.1) != "eval" and e.get("reference")]  # fmt: skip
    scored, sampled = examples[: args.examples], examples[args.examples : args.examples + args.importance_samples]
    teacher, tokenizer = models.load(args.teacher, "float32")
    n = teacher.config.num_hidden_layers
    t0 = time.time()
    out = {
        "teacher": args.teacher, "examples": len(scored), "teacher_layers": n,
        "teacher_with_context": reference_ce(teacher, tokenizer, scored, lambda e: task.teacher_messages(e, "few_shot")),
        "teacher_without_context": reference_ce(teacher, tokenizer, scored, task.student_messages),
    }  # fmt: skip
    texts = [generation.render(tokenizer, task.student_messages(e)) + e["reference"] for e in sampled]
    scores = models.layer_importance(teacher, tokenizer, texts)
    out["layer_importance"] = [round(s, 4) for s in scores]
    timed = examples[: args.speed_prompts]
    out["students"] = []
    healing = examples[args.examples + args.importance_samples :]
    for k in args.keep:
        budget = params_with(teacher, k, teacher.config.intermediate_size)
        mid = (n + k) // 2
        ways = {"evenly_spaced": (models.evenly_spaced(n, k), None), "importance": (models.most_important(scores, k), None),
                "first_and_last": ([*range(k - 1), n - 1], None), "width": (list(range(n)), width_for(teacher, n, budget)),
                "depth_and_width": (models.most_important(scores, mid), width_for(teacher, mid, budget))}  # fmt: skip
        for way in args.ways:
            keep, width = ways[way]
            student, layers = models.prune_depth(teacher, keep)
            if width is not None:
                student, _ = models.prune_width(student, width, models.mlp_channel_importance(student, tokenizer, texts))
            ce = reference_ce(student, tokenizer, scored, task.student_messages)
            row = {"layers": len(layers), "for_depth": k, "prune_by": way, "kept": layers,
                   "intermediate_size": student.config.intermediate_size, "params": models.n_params(student), "reference_ce": ce,
                   "ratio_to_teacher_without_context": round(ce / out["teacher_without_context"], 2)}  # fmt: skip
            if timed:  # the teacher timed again right before each student: a ratio of neighbours
                row["teacher_ms_per_token"] = ms_per_token(teacher, tokenizer, timed, task.student_messages)
                row["ms_per_token"] = ms_per_token(student, tokenizer, timed, task.student_messages)
                row["speedup_vs_teacher"] = round(row["teacher_ms_per_token"] / row["ms_per_token"], 2)
            if args.heal_steps:
                row["heal_losses"] = heal(student, tokenizer, healing, task.student_messages, args.heal_steps)
                row["healed_reference_ce"] = reference_ce(student, tokenizer, scored, task.student_messages)
            out["students"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            del student
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
