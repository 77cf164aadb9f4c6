"""Stage `compress`: the inference recipe of the student (quantization), written as data.

``int8_dynamic`` is torch's dynamic quantization: int8 weights with one scale per output channel in
every ``Linear`` (the head included), activations quantized on the fly per call, for CPU inference.
Before it, with ``compress.smooth_alpha``, SmoothQuant scales for the inputs of ``compress.smooth_sites``
(the MLP down projections; q/k/v; gate/up) are measured on ``compress.calibration_examples`` training
rows and written to ``smoothing.safetensors``: folded
into the float weights they leave the function unchanged and move the activations' outlier channels
into the weights, where per-channel scales absorb them. The quantized packed weights have no
safetensors form, so the stage writes the recipe, the scales and the hash of the float weights;
``models.load_quantized`` rebuilds the quantized model from the float student in about a second.
The recipe also holds the relative error of the quantized model's logits against the float model's on
the calibration rows, with and without the smoothing. The eval stage evaluates it next to the float
student.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from stillroom import atomic, models
from stillroom.plugins import registry
from stillroom.rundir import StageContext, sha256_file
from stillroom.stages.prepare import read_examples
from stillroom.stages.train import student_texts

SMOOTHING = "smoothing.safetensors"


@torch.no_grad()
def logit_errors(reference, candidates: dict, tokenizer, texts: list[str]) -> dict[str, float]:
    """Per candidate model, ||logits(model) - logits(reference)|| / ||logits(reference)|| over every token
    of ``texts``; the reference runs once per text."""
    diff, norm = dict.fromkeys(candidates, 0.0), 0.0
    for text in texts:
        enc = tokenizer(text, return_tensors="pt")
        want = reference(**enc).logits.float()
        norm += want.pow(2).sum().item()
        for name, model in candidates.items():
            diff[name] += (model(**enc).logits.float() - want).pow(2).sum().item()
    return {name: round((d / norm) ** 0.5, 5) for name, d in diff.items()}


def read_recipe(compress_dir: Path) -> tuple[dict, Path | None]:
    """A run's inference recipe and the path of its smoothing scales (None without)."""
    recipe = json.loads((compress_dir / "recipe.json").read_text())
    return recipe, compress_dir / recipe["smoothing"]["file"] if recipe.get("smoothing") else None


def run(ctx: StageContext) -> None:
    c = ctx.cfg.compress
    source = ctx.inputs["train"] / "model"
    recipe = {"method": c.quantize, "source": "train/model", "source_weights_sha256": sha256_file(source / "model.safetensors")}
    if c.quantize != "none":
        t0 = time.time()
        float_model, tokenizer = models.load(str(source))
        task = registry().get("task", ctx.cfg.data.task)
        mixture = atomic.read_jsonl(ctx.inputs["mix"] / "mixture.jsonl")
        texts = student_texts(task.student_messages, read_examples(ctx.inputs["prepare"], reference_only=True), mixture, tokenizer, c.calibration_examples)
        quantized = {"int8": models.quantize(float_model, c.quantize)}
        if c.smooth_alpha is not None:
            from safetensors.torch import save_file

            sites = tuple(dict.fromkeys(c.smooth_sites))
            scales = models.smoothing_scales(float_model, tokenizer, texts, c.smooth_alpha, sites)
            with atomic.atomic_path(ctx.dir / SMOOTHING) as tmp:
                save_file({k: v.contiguous() for k, v in scales.items()}, str(tmp), metadata={"alpha": str(c.smooth_alpha), "sites": ",".join(sites)})
            recipe["smoothing"] = {"method": "smoothquant", "sites": list(sites), "alpha": c.smooth_alpha, "file": SMOOTHING,
                                   "sha256": sha256_file(ctx.dir / SMOOTHING)}  # fmt: skip
            quantized["smoothed_int8"] = models.quantize(models.apply_smoothing(copy.deepcopy(float_model), scales), c.quantize)
        recipe["calibration_rows"] = len(texts)
        recipe["logit_rel_error"] = logit_errors(float_model, quantized, tokenizer, texts)
        model = list(quantized.values())[-1]  # what eval and serving rebuild: smoothed when there are scales
        ctx.timings["quantize_s"] = round(time.time() - t0, 3)
        recipe["quantized_linear_layers"] = models.count_quantized(model)
        recipe["weight_mb"] = round(models.weight_bytes(model) / 2**20, 1)
    atomic.write_json(ctx.dir / "recipe.json", recipe)
    ctx.counts.update(method=c.quantize, **{k: v for k, v in recipe.items() if k in ("quantized_linear_layers", "weight_mb", "logit_rel_error")})
