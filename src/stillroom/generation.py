"""The one generation path: teacher sampling, evaluation and (later) serving all go through it.

Prompts are chat messages rendered with the tokenizer's chat template, batched with left padding,
decoded until the end-of-turn token. Sampling is reproducible: each call seeds the generator state
from the given seed.

Prefix cache: when every prompt in a batch starts with the same chat turns (the teacher's few-shot
context), those turns are run through the model once, their KV cache is kept and reused for every
later batch that starts with them. The batch then holds ``[shared prefix][left padding][own suffix]``;
position ids come from the attention mask's cumulative sum, so positions stay contiguous across the
padding and the result equals running each full prompt.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class Generated:
    text: str
    token_ids: list[int]  # completion tokens, end-of-turn excluded
    prompt_tokens: int
    finished: bool  # stopped at end-of-turn (False: hit max_new_tokens)
    # Filled when top-k capture is on. One entry per completion position, plus the end-of-turn
    # position when finished (so a student can learn where to stop). From the untempered distribution.
    token_logprobs: list[float] | None = None  # log p(token actually emitted)
    topk_ids: list[list[int]] | None = None  # [positions][k]
    topk_logprobs: list[list[float]] | None = None  # [positions][k], descending

    @property
    def seq_logprob(self) -> float | None:
        return None if self.token_logprobs is None else float(sum(self.token_logprobs))


class GumbelSampler:
    """Sampling as argmax(tempered, top-p-filtered logits + Gumbel noise), with one random stream
    per row. Equivalent to drawing from the filtered distribution, and a row's draws depend on its
    own seed only, not on which other prompts share its batch."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        noise = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float32) for g in self.generators])
        gumbel = -torch.log(-torch.log(noise.clamp_min(1e-20)))
        return scores + gumbel.to(scores.device, scores.dtype)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return im_end if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else tokenizer.eos_token_id


MIN_PREFIX_TOKENS = 32  # shorter shared prefixes are not worth a cache


def shared_prefix_length(rows: list[list[int]], boundary_id: int) -> int:
    """Length of the longest common token prefix of ``rows`` that ends just after a whole chat turn
    (the last ``boundary_id`` inside it, plus the newline token that follows when shared)."""
    first, n = rows[0], min(len(r) for r in rows)
    common = 0
    while common < n and all(r[common] == first[common] for r in rows):
        common += 1
    cut = max((i for i in range(common) if first[i] == boundary_id), default=-1) + 1
    if 0 < cut < common:
        cut += 1  # the newline after the end-of-turn token
    return min(cut, n - 1)  # every row keeps at least one token of its own


class PrefixCache:
    """KV caches of shared prompt prefixes, for one model. Keyed by the prefix's token ids."""

    def __init__(self, max_entries: int = 4):
        self.entries: dict[tuple[int, ...], DynamicCache] = {}
        self.max_entries = max_entries
        self.hits = self.misses = 0

    def get(self, model, prefix: list[int]) -> DynamicCache:
        key = tuple(prefix)
        if key in self.entries:
            self.hits += 1
        else:
            self.misses += 1
            if len(self.entries) >= self.max_entries:
                self.entries.pop(next(iter(self.entries)))
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([prefix], device=model.device), cache=cache, use_cache=True)
            self.entries[key] = cache
        return self.entries[key]


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seeds: list[int] | None = None,
    top_k: int = 0,
    prefix_cache: PrefixCache | None = None,
    constraints: list[dict | None] | None = None,
) -> list[Generated]:
    """Complete each rendered prompt in one left-padded batch.

    ``sample``: draw with ``temperature`` and ``top_p``, row i from its own stream ``seeds[i]``.
    ``top_k`` > 0: capture the top-k token ids and log-probs of the untempered distribution at every
    position, and the log-prob of each emitted token, during generation (no second pass).
    ``prefix_cache``: reuse the KV cache of whole chat turns every prompt starts with.
    ``constraints``: one per prompt (``constrained``; None: free), enforced before sampling.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eot = end_of_turn_id(tokenizer)
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    cut = shared_prefix_length(rows, eot) if prefix_cache is not None else 0
    kwargs = {}
    if cut >= MIN_PREFIX_TOKENS:
        cache = copy.deepcopy(prefix_cache.get(model, rows[0][:cut]))
        cache.batch_repeat_interleave(len(rows))
        kwargs["cache"] = cache
    else:
        cut = 0
    width = max(len(r) - cut for r in rows)
    ids = torch.full((len(rows), cut + width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        start = cut + width - (len(r) - cut)  # the row's own suffix, left-padded after the prefix
        ids[i, :cut], mask[i, :cut] = torch.tensor(r[:cut], dtype=torch.long), 1
        ids[i, start:], mask[i, start:] = torch.tensor(r[cut:], dtype=torch.long), 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    processors = LogitsProcessorList()
    if constraints is not None and any(constraints):
        from stillroom import constrained

        if len(constraints) != len(rows):
            raise ValueError("constraints: one per prompt (None for a free one)")
        processors.append(constrained.logits_processor(model, tokenizer, constraints))  # first: a masked token stays masked
    if sample:
        if seeds is None or len(seeds) != len(rows):
            raise ValueError("sampling needs one seed per prompt")
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
        processors.append(GumbelSampler(seeds))
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        **kwargs,
        max_new_tokens=max_new_tokens,
        do_sample=False,  # greedy over Gumbel-perturbed logits when sampling: see GumbelSampler
        logits_processor=processors,
        eos_token_id=eot,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=top_k > 0,  # raw logits, before temperature / top-p
        return_dict_in_generate=True,
    )
    sequences = out.sequences
    new_all = sequences[:, ids.shape[1] :]
    captured = _capture_topk(out.logits, new_all, top_k) if top_k > 0 else None
    results = []
    for i, prompt in enumerate(rows):
        new = new_all[i].tolist()
        finished = eot in new
        keep = new.index(eot) if finished else len(new)
        text = tokenizer.decode(new[:keep], skip_special_tokens=False)
        extra = {}
        if captured is not None:
            positions = keep + int(finished)
            lp, tk_ids, tk_lp = captured
            extra = {
                "token_logprobs": lp[i, :positions].tolist(),
                "topk_ids": tk_ids[i, :positions].tolist(),
                "topk_logprobs": tk_lp[i, :positions].tolist(),
            }
        results.append(Generated(text.strip(), new[:keep], len(prompt), finished, **extra))
    return results


def _capture_topk(step_logits: tuple[torch.Tensor, ...], emitted: torch.Tensor, k: int):
    """Per step: [B, V] raw logits -> emitted log-prob [B], top-k ids and log-probs [B, k].
    Returns tensors [B, S], [B, S, k], [B, S, k] for S generated steps."""
    lps, ids, vals = [], [], []
    for t, logits in enumerate(step_logits):
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = logp.topk(min(k, logp.shape[-1]), dim=-1)
        lps.append(logp.gather(-1, emitted[:, t : t + 1]).squeeze(-1))
        ids.append(top.indices)
        vals.append(top.values)
    return torch.stack(lps, 1), torch.stack(ids, 1), torch.stack(vals, 1)


@torch.inference_mode()
def score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str] | list[list[int]],
    *,
    top_k: int,
) -> list[Generated]:
    """Teacher-forced scoring of given completions (text, or token ids), e.g. clean references: the
    same fields that generation captures, for completion + end-of-turn, in one forward pass."""
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    pairs = []
    for p, c in zip(prompts, completions):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] if isinstance(c, str) else list(c)
        pairs.append((p_ids, c_ids + [eot]))
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(pairs):  # right padding: positions start at 0 for every row
        ids[i, : len(p) + len(c)], mask[i, : len(p) + len(c)] = torch.tensor(p + c), 1
    logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits
    results = []
    for i, (p, c) in enumerate(pairs):
        rows = logits[i, len(p) - 1 : len(p) + len(c) - 1]  # [len(c), V] predicting each completion token
        lp, tk_ids, tk_lp = _capture_topk(tuple(rows[:, None, :].unbind(0)), torch.tensor(c)[None, :], top_k)
        results.append(Generated(
            tokenizer.decode(c[:-1]), c[:-1], len(p), True,
            lp[0].tolist(), tk_ids[0].tolist(), tk_lp[0].tolist(),
        ))  # fmt: skip
    return results


def timed_request(model, tokenizer, messages: list[dict], max_new_tokens: int, parse, constraint: dict | None = None) -> tuple[float, Generated]:
    """End-to-end latency of one request: render + tokenize + generate + decode + ``parse``. No
    prefix cache: the whole prompt, context included, is processed as a cold request would be.
    ``constraint``: decoded under that grammar (its compile and masking included)."""
    t0 = time.perf_counter()
    g = generate(model, tokenizer, [render(tokenizer, messages)], max_new_tokens=max_new_tokens,
                 constraints=[constraint] if constraint else None)[0]  # fmt: skip
    parse(g.text)
    return time.perf_counter() - t0, g
