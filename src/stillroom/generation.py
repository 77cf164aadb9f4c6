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
from transformers import DynamicCache
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Generated:
    text: str
    token_ids: list[int]  # completion tokens, end-of-turn excluded
    prompt_tokens: int
    finished: bool  # stopped at end-of-turn (False: hit max_new_tokens)


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
    seed: int = 0,
    prefix_cache: PrefixCache | None = None,
) -> list[Generated]:
    """Complete each rendered prompt; one batch, left-padded, reusing ``prefix_cache`` if given."""
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
        ids[i, :cut], mask[i, :cut] = torch.tensor(r[:cut], dtype=torch.long), 1
        ids[i, cut + width - (len(r) - cut) :], mask[i, cut + width - (len(r) - cut) :] = torch.tensor(r[cut:], dtype=torch.long), 1
    ids, mask = ids.to(model.device), mask.to(model.device)
    if sample:
        torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        **kwargs,
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=None,
        eos_token_id=eot,
        pad_token_id=tokenizer.pad_token_id,
    )
    results = []
    for row, prompt in zip(out, rows):
        new = row[ids.shape[1] :].tolist()
        finished = eot in new
        if finished:
            new = new[: new.index(eot)]
        text = tokenizer.decode(new, skip_special_tokens=False)
        results.append(Generated(text.strip(), new, len(prompt), finished))
    return results


def timed_request(model, tokenizer, messages: list[dict], max_new_tokens: int, parse) -> tuple[float, Generated]:
    """End-to-end latency of one request: render + tokenize + generate + decode + ``parse``. No
    prefix cache: the whole prompt, context included, is processed as a cold request would be."""
    t0 = time.perf_counter()
    g = generate(model, tokenizer, [render(tokenizer, messages)], max_new_tokens=max_new_tokens)[0]
    parse(g.text)
    return time.perf_counter() - t0, g
