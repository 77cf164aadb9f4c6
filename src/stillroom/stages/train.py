"""Stage `train`: the student learns, without the teacher's context, what the teacher did with it.

Read top to bottom: 1) build the student (pruned from the teacher by spacing or measured importance,
or loaded; LoRA adapters when asked), 2) build the rows (student prompt + completion, loss only on the
completion, each row weighted by its source and layer; teacher top-k or the teacher's own prompt for
KD), 3) the loop: AdamW, warmup + cosine, accumulation, clipping, dev loss, early stopping,
checkpoints that resume bit-exactly, data parallel under torchrun, 4) save a standard HF folder.

The objective of one optimizer step, over the completion tokens and pairs of all its micro-batches and
processes:

    loss = (sum_tokens  w_row * CE(student, target)  +  kd_weight * w_layer * D(teacher || student)) / tokens
         + (sum_pairs   pref_weight * w_layer * P(chosen, rejected)) / pairs

w_row is the source weight (``sft_weight`` on selected teacher sequences, ``trace_weight`` on the
assistant turns of teacher traces, ``self_weight`` on the student's own verified outputs,
``reference_weight`` on clean references) times the layer weight; D is ``kd_loss`` at
``kd_temperature`` (losses.py), on the stored top-k (offline) or on the teacher's dense logits
computed in the step (online); P is ``pref_loss`` (DPO against the student as it was before
training, whose log-probs are computed once up front, or reference-free SimPO). Logits exist
``loss_chunk`` tokens at a time (losses.fused_linear_loss); a pair's log-probs take the head over its
completion positions only. Multi-step traces are encoded turn by turn through the chat template: only
the assistant's turns carry labels, the prompt and the tool results do not.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import random
import shutil
import time

import torch
import torch.nn.functional as F

from stillroom import atomic, checkpoints, generation, models
from stillroom import distributed as dist
from stillroom.losses import dense_divergence, fused_linear_loss, preference_loss, sparse_divergence
from stillroom.plugins import registry
from stillroom.progress import add, advance, bar
from stillroom.rundir import RunError, StageContext
from stillroom.stages.generate import read_candidates, read_references
from stillroom.stages.prepare import read_examples


def lr_at(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the base lr: linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def encode(tokenizer, prompt: str, completion: str | list[int], max_length: int, weight: float, topk=None,
           teacher_prompt: str | None = None, layer_weight: float = 1.0) -> dict:  # fmt: skip
    """One training row: prompt + completion + end-of-turn ids, labels (-100 on the prompt), the row's
    CE weight and layer weight; for offline KD the teacher's top-k (ids, log-probs) per completion
    position; for online KD the teacher's own prompt + the same kept completion tokens.
    A completion given as token ids (the teacher's own) keeps those positions aligned with its top-k."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] if isinstance(completion, str) else list(completion)
    c = c + [generation.end_of_turn_id(tokenizer)]
    ids = (p + c)[:max_length]
    kept = c[: max(0, len(ids) - len(p))]
    row = {"ids": ids, "labels": ([-100] * len(p) + c)[:max_length], "weight": weight, "layer_weight": layer_weight, "topk": None}
    if topk is not None:
        row["topk"] = (len(p), topk[0], topk[1])  # label position of the first completion token
    if teacher_prompt is not None:
        tp = tokenizer(teacher_prompt, add_special_tokens=False)["input_ids"]
        row["teacher_ids"], row["teacher_labels"] = tp + kept, [-100] * len(tp) + kept
    return row


def encode_turns(tokenizer, prompt_messages: list[dict], turns: list[dict], max_length: int, weight: float,
                 layer_weight: float = 1.0) -> dict:  # fmt: skip
    """One training row from a multi-step trace: the prompt, then each assistant turn (labelled: its
    content and end-of-turn) and tool turn (not labelled), as the chat template renders them."""
    eot = generation.end_of_turn_id(tokenizer)
    ids, labels, covered, conv = [], [], "", list(prompt_messages)

    def add(text: str, train: bool) -> None:
        t = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids.extend(t)
        labels.extend(t if train else [-100] * len(t))

    for m in turns:
        if m["role"] == "assistant":
            prefix = generation.render(tokenizer, conv)
            if not prefix.startswith(covered):
                raise RuntimeError("the chat template does not render a conversation turn by turn; traces need one that does")
            add(prefix[len(covered):], False)
            add(m["content"], True)
            ids.append(eot)
            labels.append(eot)
            covered = prefix + m["content"] + tokenizer.decode([eot])
        conv.append(m)
    return {"ids": ids[:max_length], "labels": labels[:max_length], "weight": weight, "layer_weight": layer_weight, "topk": None}


def encode_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int, weight: float) -> dict:
    """A preference row: the same prompt with its chosen and its rejected completion."""
    return {"pair": True, "chosen": encode(tokenizer, prompt, chosen, max_length, 0.0), "weight": weight,
            "rejected": encode(tokenizer, prompt, rejected, max_length, 0.0), "ref": (0.0, 0.0)}  # fmt: skip


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] ids, labels, attention mask; [B] weights; with teacher top-k, [B, T, k] ids
    and log-probs and a [B, T] mask aligned with the labels; with a teacher prompt, the teacher's
    [B, T'] ids, labels and mask. Preference rows go to ``pair_*``: [2P, T] ids, labels and mask
    (the P chosen completions, then the P rejected), [P] weights and reference log-probs."""
    pairs, rows = [r for r in rows if r.get("pair")], [r for r in rows if not r.get("pair")]
    batch = _collate_pairs(pairs, pad_id) if pairs else {}
    if rows:
        batch.update(_collate_rows(rows, pad_id))
    return batch


def _collate_pairs(pairs: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    sides = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    return {"pair_input_ids": _pad([r["ids"] for r in sides], pad_id), "pair_labels": _pad([r["labels"] for r in sides], -100),
            "pair_attention_mask": _pad([[1] * len(r["ids"]) for r in sides], 0),
            "pair_weights": torch.tensor([p["weight"] for p in pairs], dtype=torch.float32),
            "pair_ref": torch.tensor([p["ref"] for p in pairs], dtype=torch.float32)}  # fmt: skip


def _collate_rows(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids, labels = _pad([r["ids"] for r in rows], pad_id), _pad([r["labels"] for r in rows], -100)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": _pad([[1] * len(r["ids"]) for r in rows], 0),
             "weights": torch.tensor([r["weight"] for r in rows], dtype=torch.float32),
             "layer_weights": torch.tensor([r["layer_weight"] for r in rows], dtype=torch.float32)}  # fmt: skip
    with_topk = [r for r in rows if r["topk"] is not None]
    if with_topk:
        k, width = len(with_topk[0]["topk"][1][0]), ids.shape[1]
        batch["kd_ids"] = torch.zeros((len(rows), width, k), dtype=torch.long)
        batch["kd_logprobs"] = torch.zeros((len(rows), width, k))
        batch["kd_mask"] = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            if r["topk"] is not None:
                start, tk_ids, tk_lp = r["topk"]
                n = max(0, min(len(tk_ids), width - start, len(r["ids"]) - start))  # 0: the prompt filled max_length
                if n == 0:
                    continue
                batch["kd_ids"][i, start : start + n] = torch.tensor(tk_ids[:n])
                batch["kd_logprobs"][i, start : start + n] = torch.tensor(tk_lp[:n], dtype=torch.float32)
                batch["kd_mask"][i, start : start + n] = True
    if "teacher_ids" in rows[0]:
        batch["teacher_input_ids"] = _pad([r["teacher_ids"] for r in rows], pad_id)
        batch["teacher_labels"] = _pad([r["teacher_labels"] for r in rows], -100)
        batch["teacher_attention_mask"] = _pad([[1] * len(r["teacher_ids"]) for r in rows], 0)
    return batch


def completion_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else 0


def pair_count(batch: dict[str, torch.Tensor]) -> int:
    return len(batch["pair_weights"]) if "pair_weights" in batch else 0


def sequence_logprobs(student, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label) over each row's labelled positions, and their count: [B] and [B].
    The head runs on the labelled positions only ([N, V], N = labelled tokens in the batch)."""
    decoder, head = models.decoder_and_head(student)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    at = labels[:, 1:] != -100
    logits = F.linear(hidden[:, :-1][at], head.weight, head.bias).float()  # [N, V]
    token_lp = logits.log_softmax(-1).gather(-1, labels[:, 1:][at][:, None]).squeeze(-1)  # [N]
    row = torch.arange(len(labels), device=labels.device)[:, None].expand_as(at)[at]  # [N]
    sums = torch.zeros(len(labels), device=token_lp.device, dtype=token_lp.dtype).index_add(0, row, token_lp)
    return sums, at.sum(-1)


def pair_loss(student, batch: dict[str, torch.Tensor], kind: str = "dpo", beta: float = 0.1, gamma: float = 0.5) -> torch.Tensor:
    """The preference objective of a micro-batch's pairs, weighted and summed (not averaged). Scalar."""
    lp, n = sequence_logprobs(student, batch["pair_input_ids"], batch["pair_attention_mask"], batch["pair_labels"])
    p = len(batch["pair_weights"])
    losses = preference_loss(lp[:p], lp[p:], kind, beta, ref_chosen_lp=batch["pair_ref"][:, 0], ref_rejected_lp=batch["pair_ref"][:, 1],
                             chosen_len=n[:p], rejected_len=n[p:], gamma=gamma)  # fmt: skip
    return (losses * batch["pair_weights"]).sum()


def completion_loss(
    student, batch: dict[str, torch.Tensor], teacher: tuple | None = None, *, kd_weight: float = 0.0,
    kd_loss: str = "forward_kl", kd_temperature: float = 1.0, kd_coef: float = 0.5, kd_tail: str = "bucket",
    chunk: int = 256,
) -> torch.Tensor:  # fmt: skip
    """The blended objective of one micro-batch, summed (not averaged) over its completion tokens.

    batch: collate's tensors, [B, T]. teacher: for online KD, (hidden [N, H_t], head weight [V, H_t],
    head bias or None) at the batch's N completion positions in row-major order; None for offline KD
    (the batch's stored top-k) or no KD. Returns a scalar.
    """
    decoder, head = models.decoder_and_head(student)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    at = batch["labels"][:, 1:] != -100  # position t predicts label t + 1
    h = hidden[:, :-1][at]  # [N, H]
    targets = batch["labels"][:, 1:][at]  # [N]
    ce_w = batch["weights"][:, None].expand_as(at)[at]  # [N]
    kd_w = batch["layer_weights"][:, None].expand_as(at)[at] * kd_weight  # [N]
    offline = teacher is None and kd_weight > 0 and "kd_mask" in batch
    if offline:
        kd_on, kd_ids, kd_lp = batch["kd_mask"][:, 1:][at], batch["kd_ids"][:, 1:][at], batch["kd_logprobs"][:, 1:][at]
    if teacher is not None and teacher[0].shape[0] != h.shape[0]:
        raise RuntimeError(f"teacher and student completion positions differ ({teacher[0].shape[0]} vs {h.shape[0]})")

    def chunk_loss(logits: torch.Tensor, s: int, e: int) -> torch.Tensor:
        ce = torch.logsumexp(logits, -1) - logits.gather(-1, targets[s:e, None]).squeeze(-1)  # keeps no [n, V] log-softmax
        loss = (ce * ce_w[s:e]).sum()
        if teacher is not None and kd_weight > 0:
            t_logits = F.linear(teacher[0][s:e], teacher[1], teacher[2])
            kd = dense_divergence(logits, t_logits, kd_loss, kd_temperature, kd_coef)
            loss = loss + (kd * kd_w[s:e]).sum()
        elif offline and bool(kd_on[s:e].any()):
            on = kd_on[s:e]
            kd = sparse_divergence(logits[on], kd_ids[s:e][on], kd_lp[s:e][on], kd_loss, kd_temperature, kd_coef, kd_tail)
            loss = loss + (kd * kd_w[s:e][on]).sum()
        return loss

    return fused_linear_loss(h, head.weight, head.bias, chunk_loss, chunk)


class Objective(torch.nn.Module):
    """The student and its loss in one module, so DistributedDataParallel sees every use of the weights
    (the head is applied inside the loss, chunk by chunk). Returns the micro-batch's share of the step
    loss: its token-level sum over the step's tokens plus its pair-level sum over the step's pairs."""

    def __init__(self, student, pref: dict | None = None, **loss_options):
        super().__init__()
        self.student, self.loss_options, self.pref = student, loss_options, pref or {}

    def forward(self, batch, teacher=None, n_tokens: int = 1, n_pairs: int = 1):
        loss = completion_loss(self.student, batch, teacher, **self.loss_options) / max(n_tokens, 1) if "labels" in batch else 0.0
        if "pair_weights" in batch:
            loss = loss + pair_loss(self.student, batch, **self.pref) / max(n_pairs, 1)
        return loss


@torch.no_grad()
def teacher_targets(teacher, batch) -> tuple | None:
    """Online KD: the teacher's final hidden states at its completion positions, [N, H_t], and its head."""
    if teacher is None or "teacher_input_ids" not in batch:
        return None
    decoder, head = teacher
    hidden = decoder(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).last_hidden_state
    return hidden[:, :-1][batch["teacher_labels"][:, 1:] != -100], head.weight, head.bias


def autocast(precision: str, device) -> torch.autocast:
    """Mixed precision for a forward pass: under ``bf16`` matmuls and attention run in bfloat16 (AMX or
    AVX512-BF16 on a recent x86 CPU, tensor cores on a GPU) while the weights, their gradients and the
    optimizer's state stay float32, and the losses take their log-softmax in float32 (``losses``)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def dev_loss(objective, rows, batch_size: int, pad_id: int, teacher, device, precision: str = "fp32") -> float | None:
    """The objective on the dev rows (no dropout): per completion token, plus per pair."""
    if not rows:
        return None
    objective.eval()
    batches = [_to(collate(rows[i : i + batch_size], pad_id), device) for i in range(0, len(rows), batch_size)]
    n_tokens, n_pairs = sum(map(completion_tokens, batches)), sum(map(pair_count, batches))
    with autocast(precision, device):
        total = sum(float(objective(b, teacher_targets(teacher, b), n_tokens, n_pairs)) for b in batches)
    objective.train()
    return total


@torch.no_grad()
def reference_logprobs(pairs: list[dict], model, batch_size: int, device, precision: str = "fp32") -> None:
    """DPO's reference: each pair's chosen and rejected log-probs under ``model`` as it is now, stored in the
    row (in the training's precision: the first step's log-ratios are then exactly 0)."""
    was_training = model.training
    model.eval()
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        b = _to(_collate_pairs(chunk, 0), device)
        with autocast(precision, device):
            lp, _ = sequence_logprobs(model, b["pair_input_ids"], b["pair_attention_mask"], b["pair_labels"])
        for j, row in enumerate(chunk):
            row["ref"] = (float(lp[j]), float(lp[len(chunk) + j]))
    model.train(was_training)


def set_dropout(model, p: float) -> None:
    """Attention dropout while training; modules copy the config value at build time, so set both."""
    model.config.attention_dropout = p
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p


def student_texts(messages_of, examples: dict, mixture: list[dict], tokenizer, n: int) -> list[str]:
    """The first ``n`` training rows of the mixture as the student sees them: its prompt, then the target."""
    train = [r for r in mixture if r["split"] == "train"][:n]
    return [generation.render(tokenizer, messages_of(examples[r["example_id"]])) + r["text"] for r in train]


def build_student(cfg, teacher_cfg, sample_texts):
    """1) The student: pruned from the (corrected, where ``adapt`` ran) teacher's layers (evenly
    spaced, or the most important on ``sample_texts(tokenizer, n)``), then, with ``keep_intermediate``,
    its MLP channels (the most active on the same texts), or loaded from a folder."""
    s = cfg.student
    if s.pruned_from == "teacher":
        teacher, tokenizer = models.load(teacher_cfg.model, "float32")
        origin = {"pruned_from": "adapt" if cfg.adapt.enabled else teacher_cfg.model, "prune_by": s.prune_by}
        keep = s.keep_layers
        texts = sample_texts(tokenizer, s.importance_samples) if s.prune_by == "importance" or s.keep_intermediate else None
        if s.prune_by == "importance":
            scores = models.layer_importance(teacher, tokenizer, texts)
            keep = models.most_important(scores, s.keep_layers)
            origin["layer_importance"] = [round(x, 5) for x in scores]
        student, layers = models.prune_depth(teacher, keep)
        del teacher
        if s.keep_intermediate is not None:  # then the kept layers' MLP channels, measured on the depth-pruned student
            width = student.config.intermediate_size
            importance = models.mlp_channel_importance(student, tokenizer, texts)
            student, _ = models.prune_width(student, s.keep_intermediate, importance)
            origin["intermediate_size"] = {"teacher": width, "kept": s.keep_intermediate}
        return student.to(models.DTYPES[s.dtype]), tokenizer, {**origin, "layers": layers}
    student, tokenizer = models.load(s.model, s.dtype)
    return student, tokenizer, {"from": s.model}


def on_policy_prompts(mixture: list[dict], examples: dict) -> list[dict]:
    """The single-turn train prompts of the mixture, once each: what the student answers on-policy."""
    ids = sorted({r["example_id"] for r in mixture if r["split"] == "train" and not r.get("messages") and r["source"] != "pair"})
    return [examples[i] for i in ids if examples[i]["expected"].get("kind") != "trace"]


def on_policy_round(ctx: StageContext, model, tokenizer, scorer, task, prompts: list[dict], messages_of, rnd: int, max_length: int) -> list[dict]:
    """One round's signal: the student samples an answer to each prompt (its own seeded stream per
    prompt and round), the teacher scores every position of it teacher-forced, in its own prompt view;
    the rows go to the store (``on_policy/round-N.parquet``, the generate schema) and come back as
    training rows that carry the teacher's top-k on the student's tokens and no cross-entropy."""
    from stillroom.stages.generate import derive_seed, record, schema, write_shard

    op, s = ctx.cfg.signals.on_policy, ctx.cfg.signals
    t_model, t_tok = scorer
    model.eval()
    store, rows = [], []
    for b in range(0, len(prompts), s.batch_size):
        batch = prompts[b : b + s.batch_size]
        seeds = [derive_seed(ctx.cfg.run.seed, e["id"], "on_policy", rnd) for e in batch]
        rendered = [generation.render(tokenizer, messages_of(e)) for e in batch]
        own = generation.generate(model, tokenizer, rendered, max_new_tokens=s.max_new_tokens, sample=True,
                                  temperature=op.temperature, top_p=1.0, seeds=seeds)  # fmt: skip
        scored = generation.score(t_model, t_tok, [generation.render(t_tok, task.teacher_messages(e, ctx.teacher.context)) for e in batch],
                                  [g.token_ids for g in own], top_k=max(s.top_k, 1))  # fmt: skip
        for e, p, g, sc, seed in zip(batch, rendered, own, scored, seeds):
            store.append(record(e["id"], rnd, "student", dataclasses.replace(sc, finished=g.finished), greedy=False,
                                temperature=op.temperature, top_p=1.0, seed=seed))  # fmt: skip
            rows.append(encode(tokenizer, p, g.token_ids, max_length, 0.0, (sc.topk_ids, sc.topk_logprobs)))
    write_shard(ctx.dir / "on_policy" / f"round-{rnd}.parquet", store, schema(len(tokenizer)))
    return rows


def with_lora(model, lora):
    """LoRA adapters through peft; only they train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                        target_modules=lora.target_modules)  # fmt: skip
    return get_peft_model(model, config)


def epoch_order(n: int, seed: int, epoch: int, world: int) -> list[int]:
    """The rows of one epoch, shuffled by (seed, epoch) alone so a resumed run sees the same order;
    under data parallelism the last n % world rows of the shuffle sit this epoch out."""
    order = list(range(n))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order[: n - n % world]


def layer_weights(mixture: list[dict], targets: dict[str, float], resampled: bool) -> dict[str, float]:
    """Per-layer loss weights: 1 when the mixture was resampled to the layer weights already; otherwise
    target share / actual share of the training records, so the loss sees the configured mixture."""
    counts = collections.Counter(r["layer"] for r in mixture if r["split"] == "train")
    if resampled or not counts:
        return {layer: 1.0 for layer in counts}
    total_target = sum(targets.get(layer, 0.0) for layer in counts) or 1.0
    n = sum(counts.values())
    return {layer: (targets.get(layer, 0.0) / total_target) / (c / n) for layer, c in counts.items()}


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def run(ctx: StageContext) -> None:
    """The student on the whole mixture, behind its context-free prompt."""
    task = registry().get("task", ctx.cfg.data.task)
    mixture = atomic.read_jsonl(ctx.inputs["mix"] / "mixture.jsonl")
    fit(ctx, ctx.cfg.train, mixture, lambda texts: build_student(ctx.cfg, ctx.teacher, texts), task.student_messages)


def fit(ctx: StageContext, t, mixture: list[dict], build, messages_of, steps: int | None = None) -> None:
    """Train a model on ``mixture`` with the objective ``t`` (a TrainConfig) and save it to
    ``ctx.dir/model``. ``build(sample_texts)`` makes the model, its tokenizer and a description of its
    origin; ``messages_of(example)`` is the prompt the model answers behind. ``steps``: a step budget
    in place of ``t.epochs`` and ``t.max_steps``: exactly that many optimizer steps, over as many epochs
    (each its own shuffle) as they need, the last one stopped part way."""
    cfg = ctx.cfg
    world, rank, device = dist.world_size(), dist.rank(), dist.device()
    torch.manual_seed(cfg.run.seed)
    task = registry().get("task", cfg.data.task)
    examples = read_examples(ctx.inputs["prepare"], reference_only=True)

    # 1) student
    t0 = time.time()

    model, tokenizer, origin = build(lambda tokenizer, n: student_texts(messages_of, examples, mixture, tokenizer, n))
    if t.lora is not None:
        model = with_lora(model, t.lora)
    elif t.train_layers is not None:
        models.train_only_top(model, t.train_layers)
    set_dropout(model, t.dropout)
    model.to(device)
    teacher = None
    if t.kd_weight > 0 and t.teacher_mode == "online":
        teacher_model, _ = models.load(ctx.teacher.model, ctx.teacher.dtype)
        teacher_model.to(device).eval().requires_grad_(False)
        teacher = models.decoder_and_head(teacher_model)
    ctx.timings["build_student_s"] = round(time.time() - t0, 3)

    # 2) data: the mixture's records (teacher sequences and traces, the student's own outputs, pairs,
    #    clean references) behind the student's context-free prompt, each weighted by its source and layer
    source_weight = {"teacher": t.sft_weight, "trace": t.trace_weight, "self": t.self_weight, "reference": t.reference_weight,
                     "pair": t.pref_weight}  # fmt: skip
    per_layer = layer_weights(mixture, cfg.data.layer_weights, cfg.data.mixture.resample)
    signals = {}
    if t.kd_weight > 0 and t.teacher_mode == "offline":  # the teacher's own tokens and top-k
        wanted = {(r["example_id"], r.get("candidate", -1)) for r in mixture if r["source"] in ("teacher", "reference")}
        cols = ["example_id", "candidate", "token_ids", "topk_ids", "topk_logprobs"]
        scored = [*read_candidates(ctx.inputs["generate"], columns=cols), *read_references(ctx.inputs["generate"], columns=cols)]
        signals = {(c["example_id"], c["candidate"]): c for c in scored if (c["example_id"], c["candidate"]) in wanted and c["topk_ids"]}
        if signals and len(tokenizer) < 1 + max(i for c in signals.values() for row in c["topk_ids"] for i in row):
            raise RuntimeError("KD needs the student to share the teacher's vocabulary (a pruned student does)")
    rows = {"train": [], "dev": []}
    for r in mixture:
        ex = examples[r["example_id"]]
        lw = per_layer.get(r["layer"], 1.0) if r["split"] == "train" else 1.0
        weight, messages = source_weight[r["source"]] * lw, messages_of(ex)
        if r["source"] == "pair":
            row = encode_pair(tokenizer, generation.render(tokenizer, messages), r["chosen"], r["rejected"], t.max_length, weight)
        elif r.get("messages"):  # a multi-step trace: loss on the assistant's turns only
            if teacher is not None:
                raise RuntimeError("train.teacher_mode: online covers single-turn records; traces need offline KD or none")
            row = encode_turns(tokenizer, messages, r["messages"], t.max_length, weight, lw)
        else:
            sig = signals.get((r["example_id"], r.get("candidate", -1))) if r["source"] in ("teacher", "reference") else None
            completion, topk = (sig["token_ids"], (sig["topk_ids"], sig["topk_logprobs"])) if sig else (r["text"], None)
            teacher_prompt = generation.render(tokenizer, task.teacher_messages(ex, ctx.teacher.context)) if teacher else None
            row = encode(tokenizer, generation.render(tokenizer, messages), completion, t.max_length, weight, topk, teacher_prompt, lw)
        rows[r["split"]].append(row)
    ctx.counts["records_by_source"] = dict(collections.Counter(f"{r['split']}/{r['source']}" for r in mixture))
    ctx.counts["kd_rows"] = sum(r.get("topk") is not None or "teacher_ids" in r for r in rows["train"]) if t.kd_weight else 0
    ctx.counts["pair_rows"] = sum(bool(r.get("pair")) for r in rows["train"])
    ctx.counts["trace_rows"] = sum(bool(r.get("messages")) for r in mixture if r["split"] == "train")
    if t.kd_weight > 0 and ctx.counts["kd_rows"] == 0:
        raise RuntimeError("train.kd_weight > 0 but no training row carries a teacher signal: the mixture's teacher "
                           "records do not match the stored candidates (re-run `mix` with --force mix)")  # fmt: skip
    if t.pref_weight > 0 and ctx.counts["pair_rows"] == 0:
        raise RuntimeError("train.pref_weight > 0 but the mixture has no preference pairs (see select/card.json: pairs)")
    if len(rows["train"]) < world:
        raise RuntimeError(
            "no training records: nothing the teacher produced passed the verifiers (see select/card.json) "
            "and the mixture has no other source (see mix/card.json)" if not rows["train"] else
            f"{len(rows['train'])} training records cannot be shared by {world} processes"
        )  # fmt: skip
    if t.pref_weight > 0 and t.pref_loss == "dpo":  # the reference model of DPO: the student before any step
        reference_logprobs([r for split in rows.values() for r in split if r.get("pair")], model, t.batch_size, device, t.precision)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # 3) the loop
    objective = Objective(model, {"kind": t.pref_loss, "beta": t.pref_beta, "gamma": t.simpo_gamma}, kd_weight=t.kd_weight, kd_loss=t.kd_loss, kd_temperature=t.kd_temperature,
                          kd_coef=t.kd_beta if t.kd_loss == "jsd" else t.kd_alpha, kd_tail=t.kd_tail, chunk=t.loss_chunk)  # fmt: skip
    wrapped = torch.nn.parallel.DistributedDataParallel(objective) if world > 1 else objective
    group_size = t.batch_size * t.grad_accum * world  # rows per optimizer step, all processes together
    steps_per_epoch = math.ceil(len(epoch_order(len(rows["train"]), 0, 0, world)) / group_size)
    epochs = t.epochs if steps is None else math.ceil(steps / steps_per_epoch)
    main_steps = steps or min(steps_per_epoch * t.epochs, t.max_steps or steps_per_epoch * t.epochs)
    on_policy = on_policy_prompts(mixture, examples) if t.on_policy_weight > 0 else []
    op_steps = math.ceil(len(on_policy) / group_size) if on_policy else 0  # one pass over the prompts per round
    total_steps = main_steps + cfg.signals.on_policy.rounds * op_steps  # the schedule spans the on-policy rounds too
    warmup = max(1, int(t.warmup_fraction * total_steps))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay, no_decay = [p for n, p in trainable if p.ndim >= 2], [p for n, p in trainable if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=t.lr)

    scratch = ctx.dir / f".checkpoint-{ctx.key[:16]}"  # kept across a kill, dropped by --force
    if dist.is_main():
        for stale in ctx.dir.glob(".checkpoint-*"):
            if stale != scratch:
                shutil.rmtree(stale)
        scratch.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = {"epoch": 0, "group": 0, "step": 0, "tokens": 0, "elapsed": 0.0, "log": [], "best_dev": None, "bad_evals": 0, "stopped": False}
    if (scratch / "state.safetensors").exists():
        try:
            state = checkpoints.load(scratch / "state.safetensors", model, opt)
        except Exception as e:  # safetensors, JSON and torch each raise their own kind for a damaged file
            raise RunError(f"cannot resume from {scratch / 'state.safetensors'} ({type(e).__name__}: {e}); the checkpoint is "
                           f"truncated or damaged. Start the training over: `stillroom train CONFIG --force train`") from None  # fmt: skip
        ctx.counts["resumed_at_step"] = state["step"]

    def checkpoint():
        if dist.is_main():
            checkpoints.save(scratch / "state.safetensors", model, opt, dict(state, elapsed=state["elapsed"] + time.time() - started))
        dist.barrier()

    def evaluate_dev() -> None:  # dev loss; remember the best weights; early stopping
        dl = dev_loss(objective, rows["dev"], t.batch_size, pad_id, teacher, device, t.precision)
        state["log"].append({"step": state["step"], "epoch": epoch, "dev_loss": dl})
        if dist.is_main():
            progress.console.print(f"step {state['step']} (epoch {epoch}): dev loss {dl if dl is None else round(dl, 4)}")
        if dl is None:
            return
        if state["best_dev"] is None or dl < state["best_dev"]:
            state["best_dev"], state["best_step"], state["bad_evals"] = dl, state["step"], 0
            if dist.is_main():
                checkpoints.save_weights(scratch / "best.safetensors", model)
        else:
            state["bad_evals"] += 1
            state["stopped"] = bool(t.early_stopping_patience and state["bad_evals"] >= t.early_stopping_patience)

    model.train()
    started = time.time()
    with bar(enabled=dist.is_main()) as progress:
        job = add(progress, "train", total_steps, "step")
        progress.advance(job, state["step"])
        for epoch in range(state["epoch"], epochs):
            order = epoch_order(len(rows["train"]), cfg.run.seed, epoch, world)
            groups = [order[i : i + group_size] for i in range(0, len(order), group_size)]
            for g in range(state["group"], len(groups)):
                mine = groups[g][rank::world]  # this process's share of the step
                batches = [_to(collate([rows["train"][j] for j in mine[i : i + t.batch_size]], pad_id), device)
                           for i in range(0, len(mine), t.batch_size)]  # fmt: skip
                local = (sum(map(completion_tokens, batches)), sum(map(pair_count, batches)),
                         sum(int(b.get("attention_mask", torch.zeros(0)).sum() + b.get("pair_attention_mask", torch.zeros(0)).sum()) for b in batches))  # fmt: skip
                n_tokens, n_pairs, step_tokens = dist.all_sum(*local)  # completion tokens and pairs: the normalizers; all tokens: throughput
                for pg in opt.param_groups:
                    pg["lr"] = t.lr * lr_at(state["step"], total_steps, warmup, t.min_lr_ratio)
                step_loss = 0.0
                for i, b in enumerate(batches):  # sum over micro-batches, normalized by the step's tokens
                    sync = contextlib.nullcontext() if world == 1 or i == len(batches) - 1 else wrapped.no_sync()
                    with sync:
                        with autocast(t.precision, device):  # the forward only; backward follows each op's forward dtype
                            loss = wrapped(b, teacher_targets(teacher, b), n_tokens, n_pairs)
                        (loss * world).backward()  # DDP averages over processes
                    step_loss += loss.item()
                step_loss = dist.all_sum(step_loss)[0]
                if not math.isfinite(step_loss):  # nothing is written: train/model never holds diverged weights
                    raise RunError(f"training diverged: the loss is {step_loss} at step {state['step'] + 1}; lower train.lr "
                                   f"(now {t.lr}) or the signal weights, then run again")  # fmt: skip
                grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], t.grad_clip).item()
                opt.step()
                opt.zero_grad(set_to_none=True)
                state["step"] += 1
                state["group"] = g + 1
                state["tokens"] += int(step_tokens)
                tps = state["tokens"] / (state["elapsed"] + time.time() - started)
                state["log"].append({"step": state["step"], "epoch": epoch, "loss": round(step_loss, 5), "grad_norm": round(grad_norm, 4),
                                     "lr": opt.param_groups[0]["lr"], "tokens_per_s": round(tps, 1)})  # fmt: skip
                advance(progress, job, 1, info=f"loss {step_loss:.3f} {tps:.0f} tok/s")
                if t.eval_every and state["step"] % t.eval_every == 0:
                    evaluate_dev()
                if state["stopped"] or state["step"] >= main_steps:  # early stop, or the step budget (train.max_steps)
                    break
                if state["step"] % t.checkpoint_every == 0:
                    checkpoint()
            if state["stopped"]:
                break
            if not t.eval_every:
                evaluate_dev()
            state.update(epoch=epoch + 1, group=0)
            if state["stopped"] or state["step"] >= main_steps:
                break
            checkpoint()

        # 4) on-policy rounds (signal `on_policy`; GKD, MiniLLM), from the best dev weights: the student samples
        #    answers to the train prompts, the teacher scores every position of them teacher-forced (its top-k,
        #    written to the signal store on_policy/round-N.parquet), and the student takes one pass over its own
        #    samples minimizing train.on_policy_loss (no cross-entropy: the tokens are its own)
        best = scratch / "best.safetensors"
        restored = t.restore_best and state["best_dev"] is not None and best.exists() and not state.get("round")
        if restored:
            checkpoints.load_weights(best, model)
        if on_policy:
            if world > 1:
                raise RuntimeError("on-policy rounds run in one process; train without torchrun, or drop signal `on_policy`")
            op_objective = Objective(model, kd_weight=t.on_policy_weight, kd_loss=t.on_policy_loss, kd_temperature=t.kd_temperature,
                                     kd_coef=t.kd_beta if t.on_policy_loss == "jsd" else t.kd_alpha, kd_tail=t.kd_tail, chunk=t.loss_chunk)  # fmt: skip
            scorer = models.load(ctx.teacher.model, ctx.teacher.dtype)
            for rnd in range(state.get("round", 0), cfg.signals.on_policy.rounds):
                op_rows = on_policy_round(ctx, model, tokenizer, scorer, task, on_policy, messages_of, rnd, t.max_length)
                model.train()
                order = epoch_order(len(op_rows), cfg.run.seed, 1000 + rnd, 1)
                for g in range(0, len(order), group_size):
                    batches = [_to(collate([op_rows[j] for j in order[g : g + group_size][i : i + t.batch_size]], pad_id), device)
                               for i in range(0, len(order[g : g + group_size]), t.batch_size)]  # fmt: skip
                    n_tokens = sum(map(completion_tokens, batches))
                    for pg in opt.param_groups:
                        pg["lr"] = t.lr * lr_at(state["step"], total_steps, warmup, t.min_lr_ratio)
                    step_loss = 0.0
                    for b in batches:
                        with autocast(t.precision, device):
                            loss = op_objective(b, None, n_tokens)
                        loss.backward()
                        step_loss += loss.item()
                    grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], t.grad_clip).item()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    state["step"] += 1
                    state["tokens"] += sum(int(b["attention_mask"].sum()) for b in batches)
                    state["log"].append({"step": state["step"], "round": rnd, "on_policy_loss": round(step_loss, 5),
                                         "grad_norm": round(grad_norm, 4), "lr": opt.param_groups[0]["lr"]})  # fmt: skip
                    advance(progress, job, 1, info=f"on-policy {step_loss:.3f}")
                state["round"] = rnd + 1
                checkpoint()
            del scorer

    # 5) save (the best dev weights when asked, then any on-policy rounds), LoRA merged into a standard folder
    elapsed = state["elapsed"] + time.time() - started
    model.eval()
    if dist.is_main():
        if t.lora is not None:
            if t.lora.save_adapter:
                with atomic.atomic_dir(ctx.dir / "adapter") as tmp:
                    model.save_pretrained(tmp)
            model = model.merge_and_unload()
        models.save(model, tokenizer, ctx.dir / "model")
        atomic.write_jsonl(ctx.dir / "log.jsonl", state["log"])
    dist.barrier()
    ctx.timings["train_s"] = round(elapsed, 3)
    train_log = [r for r in state["log"] if "loss" in r]
    ctx.counts.update(
        train_examples=len(rows["train"]), dev_examples=len(rows["dev"]), steps=state["step"], processes=world,
        global_batch=group_size, final_train_loss=train_log[-1]["loss"] if train_log else None,
        best_dev_loss=state["best_dev"], best_step=state.get("best_step"), restored_best=restored,
        early_stopped=state["stopped"], tokens_per_s=round(state["tokens"] / max(elapsed, 1e-9), 1),
        on_policy_rounds=state.get("round", 0), on_policy_prompts=len(on_policy),
        params=models.n_params(model), trainable_params=sum(p.numel() for _, p in trainable), **origin,
    )  # fmt: skip

