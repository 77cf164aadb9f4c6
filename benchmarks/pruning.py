"""How much of the teacher a depth-pruned student keeps before any training.

    python benchmarks/pruning.py [--keep 10 15 20] [--examples 48] [--teacher runs/demo/adapt/model]

For each layer count, students pruned from the demo teacher in several ways (evenly spaced, by
measured importance, the first layers plus the last), and the teacher itself with and without its
few-shot context: the cross-entropy (nats per token) of the clean reference answers of dev and train
examples, teacher-forced behind the student's context-free prompt. Lower is better; the teacher
without its context is the baseline a student starts from at best, the teacher with it the level the
distillation aims at. Importance scores (``models.layer_importance``) are measured on other training
examples than the ones scored. Prints one JSON object; nothing is trained.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=int, nargs="+", default=[10, 15, 20], help="layer counts to compare")
    ap.add_argument("--examples", type=int, default=48, help="reference answers scored")
    ap.add_argument("--importance-samples", type=int, default=32, help="training texts the importance is measured on")
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
    scores = models.layer_importance(teacher, tokenizer, [generation.render(tokenizer, task.student_messages(e)) + e["reference"] for e in sampled])
    out["layer_importance"] = [round(s, 4) for s in scores]
    out["students"] = []
    for k in args.keep:
        ways = {"evenly_spaced": models.evenly_spaced(n, k), "importance": models.most_important(scores, k),
                "first_and_last": [*range(k - 1), n - 1]}  # fmt: skip
        for way, keep in ways.items():
            student, layers = models.prune_depth(teacher, keep)
            ce = reference_ce(student, tokenizer, scored, task.student_messages)
            out["students"].append({"layers": k, "prune_by": way, "kept": layers, "reference_ce": ce,
                                    "ratio_to_teacher_without_context": round(ce / out["teacher_without_context"], 2)})  # fmt: skip
            del student
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
