"""Inference engines behind one Protocol, for serving and evaluation.

- ``torch``: a transformers model through ``generation.generate`` (today's path: batched, optional
  shared-prefix KV cache, top-k captured during generation); int8 dynamic quantization as registered.
- ``llamacpp``: a GGUF file through llama-cpp-python (the optional extra ``llamacpp``; it builds
  llama.cpp from source). One sequence at a time, the KV cache of the previous prompt's longest common
  prefix reused (a few-shot context is computed once).

Both engines render and tokenize with the same Hugging Face tokenizer (the model's chat template,
``generation.render``) and decode the same way, so a prompt is the same token ids on either engine and
only the arithmetic differs. Greedy decoding picks the argmax on both; sampling draws from the
tempered, top-p-filtered distribution with one random stream per request seed on both, but the streams
differ (torch's generator vs numpy's), so sampled texts differ between engines for the same seed.
Log-probs (``top_k`` > 0) are of the untempered distribution on both.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np

from stillroom.generation import Generated
from stillroom.teachers import Sampling

ENGINES = ("torch", "llamacpp")
_LOADING = threading.Lock()  # _model_params swaps a module attribute for the length of one load


class Engine(Protocol):
    name: str  # "torch" or "llamacpp"
    tokenizer: object  # the Hugging Face tokenizer: prompts are rendered and counted with it on every engine
    context_length: int | None  # tokens the model attends over (prompt + completion); None when unknown

    def complete(self, conversations: list[list[dict]], sampling: Sampling, seeds: list[int], top_k: int,
                 constraints: list[dict | None] | None = None) -> list[Generated]:  # fmt: skip
        """One completion per conversation (chat messages); ``seeds[i]`` drives conversation i's sampling;
        ``top_k`` > 0 fills ``token_logprobs`` (and the top-k ids and log-probs, of the unmasked logits) per
        completion position; ``constraints[i]`` (``constrained``, None: free) holds completion i to a format."""


class TorchEngine:
    """A loaded transformers model (float or quantized)."""

    name = "torch"

    def __init__(self, model, tokenizer, prefix_cache: bool = False):
        from stillroom.generation import PrefixCache

        self.model, self.tokenizer = model, tokenizer
        self.context_length = getattr(model.config, "max_position_embeddings", None)
        self.prefix_cache = PrefixCache() if prefix_cache else None

    def complete(self, conversations, sampling: Sampling, seeds, top_k: int, constraints=None) -> list[Generated]:
        from stillroom import generation

        prompts = [generation.render(self.tokenizer, c) for c in conversations]
        return generation.generate(self.model, self.tokenizer, prompts, max_new_tokens=sampling.max_new_tokens, sample=sampling.sample,
                                   temperature=sampling.temperature, top_p=sampling.top_p, seeds=seeds, top_k=top_k,
                                   prefix_cache=self.prefix_cache, constraints=constraints)  # fmt: skip


def llamacpp_available() -> str | None:
    """None when llama-cpp-python imports; otherwise what to do about it."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}): pip install 'stillroom[llamacpp]' (it builds llama.cpp from source)"
    return None


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max()
    return z - np.log(np.exp(z).sum())


def _draw(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Greedy, or a draw from the tempered, top-p-filtered distribution."""
    if not sampling.sample:
        return int(logits.argmax())
    p = np.exp(_log_softmax(logits / sampling.temperature))
    if sampling.top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), sampling.top_p)) + 1]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask
    return int(rng.choice(len(p), p=p / p.sum()))


@contextmanager
def _model_params(extra_buffers: bool):
    """llama.cpp's model parameters with ``use_extra_bufts`` as asked. Its extra buffer types hold weights
    repacked for the CPU's matrix units (AMX, interleaved SIMD layouts); on this machine kind (a VM whose
    CPU reports AMX-INT8) a build with ``GGML_NATIVE=ON`` crashed with a general protection fault at
    ``ldtilecfg`` on every quantized matmul, while plain buffers serve the same files. llama-cpp-python's
    ``Llama`` does not take this parameter, so its defaults are wrapped for the duration of one load."""
    import llama_cpp.llama_cpp as lib

    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_buffers
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = default


class LlamaCppEngine:
    """A GGUF file on llama.cpp. ``tokenizer``: the Hugging Face tokenizer the model was trained with
    (the registry version's, or read from the GGUF by transformers). ``extra_buffers``: let llama.cpp
    repack weights for AMX / SIMD kernels (off by default: see ``_model_params``)."""

    name = "llamacpp"

    def __init__(self, gguf_path: str | Path, tokenizer, n_ctx: int | None = None, n_threads: int | None = None,
                 extra_buffers: bool = False):  # fmt: skip
        problem = llamacpp_available()
        if problem:
            raise RuntimeError(problem)
        import torch
        from llama_cpp import Llama

        from stillroom.generation import end_of_turn_id

        self.path, self.tokenizer = Path(gguf_path), tokenizer
        threads = n_threads or torch.get_num_threads()  # the same threads as the torch engine: like with like
        with _LOADING, _model_params(extra_buffers):
            self.llm = Llama(model_path=str(self.path), n_ctx=n_ctx or 0, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.context_length = self.llm.n_ctx()
        self.eot = end_of_turn_id(tokenizer)
        self.n_vocab = self.llm.n_vocab()
        self.cached: list[int] = []  # the tokens whose keys and values the context holds
        self.lock = threading.Lock()  # one llama.cpp context: one sequence at a time

    def complete(self, conversations, sampling: Sampling, seeds, top_k: int, constraints=None) -> list[Generated]:
        from stillroom import generation

        constraints = constraints or [None] * len(conversations)
        if len(constraints) != len(conversations):
            raise ValueError("constraints: one per conversation (None for a free one)")
        with self.lock:
            return [self._one(generation.render(self.tokenizer, c), sampling, seed, top_k, constraint)
                    for c, seed, constraint in zip(conversations, seeds, constraints)]  # fmt: skip

    def forget(self) -> None:
        """Reuse no cached prefix for the next request (a cold request, as eval's latency pass times them)."""
        with self.lock:
            self.cached = []

    def _logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,)).astype(np.float32)

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Evaluate ``ids``, keeping the cached keys and values of the longest prefix shared with the
        previous sequence (at least the last token is evaluated, for its logits). Returns the last logits."""
        common = 0
        for a, b in zip(self.cached, ids[:-1]):
            if a != b:
                break
            common += 1
        self.llm.n_tokens = common  # eval drops the cache past n_tokens before it decodes
        self.cached = self.cached[:common]
        self.llm.eval(ids[common:])
        logits = self._logits()
        self.cached = list(ids)
        return logits

    def _mask(self, constraint: dict | None):
        """The constraint's grammar over this model's vocabulary: a function that masks a step's logits
        in place (tokens the grammar refuses to -inf) and one that advances it by the chosen token; the
        same xgrammar grammar the torch engine uses, so a format means the same thing on both engines."""
        if constraint is None:
            return None, None
        import torch
        import xgrammar as xgr

        from stillroom import constrained

        matcher = xgr.GrammarMatcher(constrained.compile_for(self.tokenizer, self.n_vocab, constraint))
        bitmask = xgr.allocate_token_bitmask(1, self.n_vocab)

        def mask(logits: np.ndarray) -> None:
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(bitmask, 0)
                xgr.apply_token_bitmask_inplace(torch.from_numpy(logits)[None], bitmask, vocab_size=self.n_vocab)

        def accept(token: int) -> None:
            if not matcher.is_terminated() and not matcher.accept_token(token):
                raise RuntimeError(f"token {token} was drawn although its grammar refuses it")

        return mask, accept

    def _one(self, prompt: str, sampling: Sampling, seed: int, top_k: int, constraint: dict | None = None) -> Generated:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) >= self.context_length:
            raise ValueError(f"the prompt is {len(ids)} tokens; the llama.cpp context holds {self.context_length}")
        logits = self._prefill(ids)
        rng = np.random.default_rng(seed)
        new, lps, tk_ids, tk_lps, finished = [], [], [], [], False
        mask, accept = self._mask(constraint)
        for _ in range(min(sampling.max_new_tokens, self.context_length - len(ids))):
            raw = logits
            if mask is not None:
                logits = raw.copy()
                mask(logits)
            token = _draw(logits, sampling, rng)
            if accept is not None:
                accept(token)
            if top_k > 0:  # log-probs of the model's own (unmasked) distribution, as the torch engine reports them
                logp = _log_softmax(raw)
                top = np.argpartition(-logp, min(top_k, len(logp)) - 1)[:top_k]  # a full sort per token costs ms
                top = top[np.argsort(-logp[top], kind="stable")]
                lps.append(float(logp[token]))
                tk_ids.append(top.tolist())
                tk_lps.append(logp[top].tolist())
            if token == self.eot:
                finished = True
                break
            new.append(token)
            self.llm.eval([token])
            logits = self._logits()
            self.cached.append(token)
        text = self.tokenizer.decode(new, skip_special_tokens=False)
        extra = {"token_logprobs": lps, "topk_ids": tk_ids, "topk_logprobs": tk_lps} if top_k > 0 else {}
        return Generated(text.strip(), new, len(ids), finished, **extra)


def load(engine: str, model_dir: str | Path, quantize: str = "none", smoothing=None, gguf: str | Path | None = None,
         prefix_cache: bool = False) -> Engine:  # fmt: skip
    """An engine over a model folder: ``torch`` loads the folder (quantized as given); ``llamacpp``
    serves ``gguf`` with the folder's tokenizer."""
    from stillroom import models

    if engine == "torch":
        model, tokenizer = models.load_quantized(str(model_dir), quantize, smoothing=smoothing)
        return TorchEngine(model, tokenizer, prefix_cache)
    if engine == "llamacpp":
        from transformers import AutoTokenizer

        if gguf is None:
            raise ValueError("the llamacpp engine needs a GGUF file (`stillroom export`)")
        return LlamaCppEngine(gguf, AutoTokenizer.from_pretrained(models.resolve(str(model_dir))))
    raise ValueError(f"unknown engine {engine!r}; one of {', '.join(ENGINES)}")
