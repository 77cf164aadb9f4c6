"""Stage `train`: the student learns, without the teacher's context, what the teacher did with it.

Read top to bottom: 1) build the student, 2) build the data (student prompt + selected teacher
completion, and the clean reference where the example has one; loss only on the completion, each
source with its weight), 3) the loop: AdamW, warmup + cosine, accumulation, clipping, dev loss after
each epoch, 4) save a standard Hugging Face folder.

    loss = sum over completion tokens of (weight of the token's source * cross-entropy) / token count

"""

from __future__ import annotations

import collections
import math
import random
import time

import torch

from stillroom import atomic, generation, models
from stillroom.losses import sparse_forward_kl
from stillroom.plugins import registry
from stillroom.progress import add, advance, bar
from stillroom.rundir import StageContext
from stillroom.stages.generate import read_candidates
from stillroom.stages.prepare import read_examples


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr: linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def encode(tokenizer, prompt: str, completion: str | list[int], max_length: int, weight: float, topk=None) -> dict:
    """One training row: prompt + completion + end-of-turn token ids, labels (-100 on the prompt),
    the row's loss weight and, for KD, the teacher's top-k (ids, log-probs) per completion position.
    A completion given as token ids (the teacher's own) keeps those positions aligned with its top-k."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] if isinstance(completion, str) else list(completion)
    c = c + [generation.end_of_turn_id(tokenizer)]
    row = {"ids": (p + c)[:max_length], "labels": ([-100] * len(p) + c)[:max_length], "weight": weight, "topk": None}
    if topk is not None:
        row["topk"] = (len(p), topk[0], topk[1])  # label position of the first completion token
    return row


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] ids, labels, attention mask; [B] weights; and when any row carries teacher
    top-k, [B, T, k] ids and log-probs with a [B, T] mask, aligned with the labels."""
    width = max(len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["ids"]), torch.tensor(r["labels"]), 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask,
             "weights": torch.tensor([r["weight"] for r in rows], dtype=torch.float32)}  # fmt: skip
    with_topk = [r for r in rows if r["topk"] is not None]
    if with_topk:
        k = len(with_topk[0]["topk"][1][0])
        batch["kd_ids"] = torch.zeros((len(rows), width, k), dtype=torch.long)
        batch["kd_logprobs"] = torch.zeros((len(rows), width, k))
        batch["kd_mask"] = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r["topk"] is not None:
                start, tk_ids, tk_lp = r["topk"]
                n = min(len(tk_ids), width - start, len(r["ids"]) - start)
                batch["kd_ids"][i, start : start + n] = torch.tensor(tk_ids[:n])
                batch["kd_logprobs"][i, start : start + n] = torch.tensor(tk_lp[:n], dtype=torch.float32)
                batch["kd_mask"][i, start : start + n] = True
    return batch


def token_loss_sum(model, batch: dict[str, torch.Tensor], kd_weight: float = 0.0, kd_temperature: float = 1.0) -> tuple[torch.Tensor, int]:
    """The blended objective, summed over completion tokens, and the token count. [B, T] in, scalar out.

    sum over tokens of (source weight * cross-entropy) + kd_weight * sparse forward KL to the teacher's
    top-k, the KL only where the row carries teacher top-k (selected teacher sequences).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none"
    ).view_as(targets)  # [B, T-1], 0 where ignored
    loss = (per_token * batch["weights"][:, None]).sum()
    if kd_weight > 0 and "kd_mask" in batch:
        m = batch["kd_mask"][:, 1:]  # label positions 1.. are predicted by logits 0..
        kd = sparse_forward_kl(logits[:, :-1][m], batch["kd_ids"][:, 1:][m], batch["kd_logprobs"][:, 1:][m], kd_temperature)
        loss = loss + kd_weight * kd.sum()
    return loss, int((targets != -100).sum())


@torch.no_grad()
def dev_loss(model, rows, batch_size: int, pad_id: int, kd_weight: float, kd_temperature: float) -> float | None:
    if not rows:
        return None
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        loss, n = token_loss_sum(model, collate(rows[i : i + batch_size], pad_id), kd_weight, kd_temperature)
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
    examples = read_examples(ctx.inputs["prepare"])
    mixture = atomic.read_jsonl(ctx.inputs["mix"] / "mixture.jsonl")
    weight = {"teacher": t.sft_weight, "reference": t.reference_weight}
    signals = {}
    if t.kd_weight > 0:  # the teacher's own tokens and top-k for every selected sequence
        wanted = {(r["example_id"], r["candidate"]) for r in mixture if r["source"] == "teacher"}
        cols = ["example_id", "candidate", "token_ids", "topk_ids", "topk_logprobs"]
        for c in read_candidates(ctx.inputs["generate"], columns=cols):
            if (c["example_id"], c["candidate"]) in wanted:
                signals[(c["example_id"], c["candidate"])] = c
        if signals and len(tokenizer) < 1 + max(i for c in signals.values() for row in c["topk_ids"] for i in row):
            raise RuntimeError("KD needs the student to share the teacher's vocabulary (a pruned student does)")
    rows = {"train": [], "dev": []}
    for r in mixture:
        prompt = generation.render(tokenizer, task.student_messages(examples[r["example_id"]]))
        sig = signals.get((r["example_id"], r.get("candidate")))
        completion, topk = (sig["token_ids"], (sig["topk_ids"], sig["topk_logprobs"])) if sig else (r["text"], None)
        rows[r["split"]].append(encode(tokenizer, prompt, completion, t.max_length, weight[r["source"]], topk))
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
                n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)  # normalizer of the step
                for pg in opt.param_groups:
                    pg["lr"] = t.lr * lr_at(step, total_steps, warmup, t.min_lr_ratio)
                step_loss = 0.0
                for b in batches:  # sum over micro-batches, normalized by the step's token count
                    loss_sum, _ = token_loss_sum(model, b, t.kd_weight, t.kd_temperature)
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
            dl = dev_loss(model, rows["dev"], t.batch_size, pad_id, t.kd_weight, t.kd_temperature)
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
