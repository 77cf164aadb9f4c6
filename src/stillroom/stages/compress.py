"""Stage `compress`: the inference recipe of the student (quantization), written as data.

``int8_dynamic`` is torch's dynamic quantization: int8 weights in every ``Linear`` (the head included),
activations quantized on the fly per call, for CPU inference. Its packed weights have no safetensors
form, so the stage writes the recipe and the hash of the float weights it applies to;
``models.load_quantized`` rebuilds the quantized model from the float student in about a second,
bit-identically. The eval stage evaluates it next to the float student.
"""

from __future__ import annotations

import time

from stillroom import atomic, models
from stillroom.rundir import StageContext, sha256_file


def run(ctx: StageContext) -> None:
    method = ctx.cfg.compress.quantize
    source = ctx.inputs["train"] / "model"
    recipe = {"method": method, "source": "train/model", "source_weights_sha256": sha256_file(source / "model.safetensors")}
    if method != "none":
        t0 = time.time()
        model, _ = models.load_quantized(str(source), method)
        ctx.timings["quantize_s"] = round(time.time() - t0, 3)
        recipe["quantized_linear_layers"] = models.count_quantized(model)
        recipe["weight_mb"] = round(models.weight_bytes(model) / 2**20, 1)
    atomic.write_json(ctx.dir / "recipe.json", recipe)
    ctx.counts.update(method=method, **{k: v for k, v in recipe.items() if k in ("quantized_linear_layers", "weight_mb")})
