"""Stage `train`: the student learns, without the teacher's context, what the teacher did with it.

Read top to bottom: 1) build the student, 2) build the data (student prompt + selected teacher
completion, and the clean reference where the example has one; loss only on the completion, each
source with its weight), 3) the loop: AdamW, warmup + cosine, accumulation, clipping, dev loss after
each epoch, 4) save a standard Hugging Face folder.

    loss = sum over completion tokens of (weight of the token's source * cross-entropy) / token count

"""

from __future__ import annotations

import collections
import json
import math
import random
import time

import torch

from stillroom import atomic, generation, models
from stillroom.plugins import registry
from stillroom.progress import add, advance, bar
from stillroom.rundir import StageContext
from stillroom.stages.prepare import read_split


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr: linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def encode(tokenizer, prompt: str, completion: str, max_length: int, weight: float) -> tuple[list[int], list[int], float]:
    """Token ids, labels (-100 on the prompt) and loss weight for prompt + completion + end-of-turn."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [generation.end_of_turn_id(tokenizer)]
    ids, labels = (p + c)[:max_length], ([-100] * len(p) + c)[:max_length]
    return ids, labels, weight


def collate(rows: list[tuple[list[int], list[int], float]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] ids, labels, attention mask, and [B] weights."""
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y, _) in enumerate(rows):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    weights = torch.tensor([w for _, _, w in rows], dtype=torch.float32)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weights": weights}


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Weighted sum of cross-entropy over completion tokens, and their count. [B, T] in, scalar out."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    ).view_as(targets)  # [B, T-1], 0 where ignored
    return (per_token * batch["weights"][:, None]).sum(), int((targets != -100).sum())


@torch.no_grad()
def dev_loss(model, rows, batch_size: int, pad_id: int) -> float | None:
    if not rows:
        return None
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        loss, n = token_loss_sum(model, collate(rows[i : i + batch_size], pad_id))
        total, count = total + loss.item(), count + n
    model.train()
    return total / max(count, 1)


def set_dropout(model, p: float) -> None:
    """Attention dropout while training; modules copy the config value at build time, so set both."""
    model.config.attention_dropout = p
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p


def build_student(cfg):
    """1) The student: pruned from the teacher's layers, or loaded from a folder."""
    s = cfg.student
    if s.pruned_from == "teacher":
        teacher, tokenizer = models.load(cfg.teacher.model, "float32")
        student, layers = models.prune_depth(teacher, s.keep_layers)
        del teacher
        return student.to(models.DTYPES[s.dtype]), tokenizer, {"pruned_from": cfg.teacher.model, "layers": layers}
    student, tokenizer = models.load(s.model, s.dtype)
    return student, tokenizer, {"from": s.model}


def run(ctx: StageContext) -> None:
    cfg, t = ctx.cfg, ctx.cfg.train
    torch.manual_seed(cfg.run.seed)
    rng = random.Random(cfg.run.seed)
    task = registry().get("task", cfg.data.task)

    # 1) student
    t0 = time.time()
    model, tokenizer, origin = build_student(cfg)
    set_dropout(model, t.dropout)
    ctx.timings["build_student_s"] = round(time.time() - t0, 3)

    # 2) data: the mixture's records (selected teacher sequences, clean references) behind the
    #    student's context-free prompt, each weighted by its source
    examples = {e["id"]: e for s in ("train", "dev") for e in read_split(ctx.inputs["prepare"], s)}
    with open(ctx.inputs["mix"] / "mixture.jsonl") as f:
        mixture = [json.loads(line) for line in f]
    weight = {"teacher": t.sft_weight, "reference": t.reference_weight}
    rows = {"train": [], "dev": []}
    for r in mixture:
        prompt = generation.render(tokenizer, task.student_messages(examples[r["example_id"]]))
        rows[r["split"]].append(encode(tokenizer, prompt, r["text"], t.max_length, weight[r["source"]]))
    ctx.counts["records_by_source"] = dict(collections.Counter(f"{r['split']}/{r['source']}" for r in mixture))
    if not rows["train"]:
        raise RuntimeError(
            "no training records: nothing the teacher produced passed the verifiers (see select/card.json) "
            "and the mixture has no other source (see mix/card.json)"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # 3) the loop
    micro_per_epoch = math.ceil(len(rows["train"]) / t.batch_size)
    total_steps = math.ceil(micro_per_epoch * t.epochs / t.grad_accum)
    warmup = max(1, int(t.warmup_fraction * total_steps))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)
    model.train()
    log, step, seen_tokens, started = [], 0, 0, time.time()
    with bar() as progress:
        job = add(progress, "train", total_steps, "step")
        for epoch in range(t.epochs):
            order = list(range(len(rows["train"])))
            rng.shuffle(order)
            micro = [order[i : i + t.batch_size] for i in range(0, len(order), t.batch_size)]
            for g in range(0, len(micro), t.grad_accum):
                group = micro[g : g + t.grad_accum]
                batches = [collate([rows["train"][j] for j in idx], pad_id) for idx in group]
                n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
                for pg in opt.param_groups:
                    pg["lr"] = t.lr * lr_at(step, total_steps, warmup, t.min_lr_ratio)
                step_loss = 0.0
                for b in batches:  # sum over micro-batches, normalized by the step's token count
                    loss_sum, _ = token_loss_sum(model, b)
                    loss = loss_sum / max(n_tokens, 1)
                    loss.backward()
                    step_loss += loss.item()
                    seen_tokens += int(b["attention_mask"].sum())
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item()
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                tps = seen_tokens / (time.time() - started)
                log.append({"step": step, "epoch": epoch, "loss": round(step_loss, 5), "grad_norm": round(grad_norm, 4),
                            "lr": opt.param_groups[0]["lr"], "tokens_per_s": round(tps, 1)})  # fmt: skip
                advance(progress, job, 1, info=f"loss {step_loss:.3f} {tps:.0f} tok/s")
            dl = dev_loss(model, rows["dev"], t.batch_size, pad_id)
            log.append({"epoch_end": epoch, "dev_loss": dl})
            progress.console.print(f"epoch {epoch}: train loss {step_loss:.4f}, dev loss {dl if dl is None else round(dl, 4)}")

    # 4) save
    model.eval()
    models.save(model, tokenizer, ctx.dir / "model")
    atomic.write_jsonl(ctx.dir / "log.jsonl", log)
    ctx.timings["train_s"] = round(time.time() - started, 3)
    ctx.counts.update(
        train_examples=len(rows["train"]), dev_examples=len(rows["dev"]), steps=step,
        final_train_loss=log[-2]["loss"] if len(log) > 1 else None, final_dev_loss=log[-1]["dev_loss"],
        tokens_per_s=round(seen_tokens / (time.time() - started), 1), params=models.n_params(model), **origin,
    )  # fmt: skip
