"""Teacher backends behind one Protocol, registered under plugin kind ``teacher``.

- ``hf``: a local transformers model (``default`` included), batched, with the shared-prefix KV cache,
  top-k captured during generation.
- ``openai``: any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, a hosted API,
  ``stillroom``'s own server), through its ``logprobs`` / ``top_logprobs``; bounded concurrency,
  retries with exponential backoff on 429 / 5xx / network errors, timeouts.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from stillroom.generation import Generated


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_p: float = 1.0


class TeacherError(RuntimeError):
    pass


class Teacher(Protocol):
    id: str
    vocab_size: int | None  # for the store's id type; None when unknown (remote)

    def complete(self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int], top_k: int,
                 constraints: list[dict | None] | None = None) -> list[Generated]:  # fmt: skip
        """One completion per conversation; ``seeds[i]`` drives conversation i's sampling; ``constraints[i]``
        (``constrained``; local models only) holds it to a format."""

    def score(self, conversations: list[list[dict]], completions: list[str], top_k: int) -> list[Generated]:
        """Teacher-forced log-probs of given completions."""


class HFTeacher:
    def __init__(self, model, tokenizer, teacher_id: str):
        from stillroom.generation import PrefixCache

        self.model, self.tokenizer, self.id = model, tokenizer, teacher_id
        self.vocab_size = len(tokenizer)
        self.prefix_cache = PrefixCache()  # the few-shot context is computed once for the run

    @classmethod
    def load(cls, spec: str, dtype: str = "float32", quantize: str = "none", smoothing=None) -> HFTeacher:
        import os

        from stillroom import models

        model, tokenizer = models.load_quantized(spec, quantize, dtype, smoothing)
        return cls(model, tokenizer, spec if spec == "default" else os.path.basename(os.path.normpath(spec)))

    def complete(self, conversations, sampling: Sampling, seeds, top_k: int, constraints=None) -> list[Generated]:
        from stillroom import generation

        prompts = [generation.render(self.tokenizer, c) for c in conversations]
        return generation.generate(
            self.model, self.tokenizer, prompts, max_new_tokens=sampling.max_new_tokens, sample=sampling.sample,
            temperature=sampling.temperature, top_p=sampling.top_p, seeds=seeds, top_k=top_k,
            prefix_cache=self.prefix_cache, constraints=constraints,
        )  # fmt: skip

    def score(self, conversations, completions, top_k: int) -> list[Generated]:
        from stillroom import generation

        prompts = [generation.render(self.tokenizer, c) for c in conversations]
        return generation.score(self.model, self.tokenizer, prompts, completions, top_k=top_k)


RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class OpenAITeacher:
    """Chat completions over HTTP. Token ids come from vLLM's ``return_tokens_as_token_ids``
    (``"token_id:123"``); endpoints that return token strings need ``tokenizer`` to map them."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, concurrency: int = 4,
                 timeout_s: float = 60.0, max_retries: int = 4, backoff_s: float = 0.5, tokenizer=None):  # fmt: skip
        import httpx

        self.base_url, self.model, self.id = base_url.rstrip("/"), model, f"openai:{model}"
        self.concurrency, self.max_retries, self.backoff_s = concurrency, max_retries, backoff_s
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer) if tokenizer is not None else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(timeout=timeout_s, headers=headers)
        self.retries = 0  # requests retried, for the manifest

    def _post(self, body: dict) -> dict:
        import httpx

        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.max_retries + 1):
            try:
                r = self.client.post(url, json=body)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    return r.json()
                if r.status_code not in RETRY_STATUS:
                    raise TeacherError(f"{url} answered {r.status_code}: {r.text[:300]}")
                problem = f"HTTP {r.status_code}"
            if attempt == self.max_retries:
                raise TeacherError(f"{url} failed after {attempt + 1} attempts, last: {problem}")
            self.retries += 1
            time.sleep(self.backoff_s * 2**attempt)
        raise TeacherError(f"{url}: max_retries must be >= 0")

    def _token_id(self, token: str) -> int:
        if token.startswith("token_id:"):
            return int(token.split(":", 1)[1])
        if self.tokenizer is None:
            raise TeacherError(
                f"the endpoint returned token strings ({token!r}), not ids: serve with vLLM's "
                "return_tokens_as_token_ids support, or give the teacher a tokenizer folder"
            )
        return self.tokenizer.convert_tokens_to_ids(token)

    def _one(self, messages: list[dict], sampling: Sampling, seed: int, top_k: int) -> Generated:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature if sampling.sample else 0.0,
            "top_p": sampling.top_p if sampling.sample else 1.0,
            "seed": seed,
            "logprobs": True,
            "top_logprobs": top_k,
            "return_tokens_as_token_ids": True,
        }
        data = self._post(body)
        choice = data["choices"][0]
        content = (choice.get("logprobs") or {}).get("content")
        if not content:
            raise TeacherError(
                f"{self.base_url} returned no logprobs for model {self.model!r}; the endpoint must support "
                "`logprobs`/`top_logprobs` (vLLM: raise --max-logprobs), or set signals.top_k: 0"
            )
        ids = [self._token_id(t["token"]) for t in content]
        finished = choice.get("finish_reason") == "stop"
        extra = {}
        if top_k > 0:
            extra = {
                "token_logprobs": [t["logprob"] for t in content],
                "topk_ids": [[self._token_id(x["token"]) for x in t["top_logprobs"]] for t in content],
                "topk_logprobs": [[x["logprob"] for x in t["top_logprobs"]] for t in content],
            }
        usage = data.get("usage") or {}
        text = (choice["message"]["content"] or "").strip()
        # chat APIs report emitted tokens only: no entry for the end-of-turn position
        return Generated(text, ids, usage.get("prompt_tokens", 0), finished, **extra)

    def complete(self, conversations, sampling: Sampling, seeds, top_k: int, constraints=None) -> list[Generated]:
        if constraints is not None and any(constraints):
            raise TeacherError("constrained decoding runs in a local model's decoding loop: use teacher.backend hf")
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda a: self._one(a[0], sampling, a[1], top_k), zip(conversations, seeds)))

    def score(self, conversations, completions, top_k: int) -> list[Generated]:
        raise TeacherError("the openai backend cannot score given completions (chat APIs have no echo); use `hf`")
