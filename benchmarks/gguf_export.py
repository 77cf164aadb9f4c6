"""Round-trip error of `stillroom export`: each GGUF format read back by transformers' GGUF loader,
its logits against the float model's on the same prompts.

    python benchmarks/gguf_export.py [--run runs/demo | --model FOLDER|default] [--formats f16 q8_0 q4_0]

The model is a run's student (``train/model``, with its SmoothQuant scales folded, as `stillroom export`
does) when ``--run`` names a finished run, else ``--model`` (``default``: the default teacher,
dequantized from its shipped GGUF, exported as if it were a student). Prompts are the run's held-out
examples in the student's view, or fixed chat prompts for ``--model``. Prints JSON per format: max |logit
difference|, that over the largest |logit| (max-abs relative), the RMS relative error
(||diff|| / ||logits||), greedy next-token agreement, file size and export seconds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "What is the weather in Paris tomorrow?",
    "Convert 12 miles to kilometres, please.",
    "Write a haiku about tea.",
    "Book a table for 4 at 7pm at Luigi's.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--model", default="default", help="used when --run is not a finished run")
    ap.add_argument("--formats", nargs="+", default=["f16", "q8_0", "q4_0"])
    ap.add_argument("--prompts", type=int, default=8)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from stillroom import export, generation, models

    run = Path(args.run)
    smoothing = None
    if (run / "train" / "model" / "config.json").exists():
        import yaml

        from stillroom.plugins import registry
        from stillroom.stages.compress import read_recipe
        from stillroom.stages.prepare import read_split

        source = run / "train" / "model"
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        task = registry().get("task", cfg["data"]["task"])
        conversations = [task.student_messages(e) for e in read_split(run / "prepare", cfg["eval"]["split"])[: args.prompts]]
        if (run / "compress" / "recipe.json").exists():
            smoothing = read_recipe(run / "compress")[1]
        what = f"student of {run}"
    else:
        source = models.resolve(args.model)
        conversations = [[{"role": "user", "content": p}] for p in PROMPTS[: args.prompts]]
        what = f"model {args.model}"
    model, tokenizer = models.load(str(source))
    if smoothing is not None:
        from safetensors.torch import load_file

        models.apply_smoothing(model, load_file(str(smoothing)))
    texts = [generation.render(tokenizer, c) for c in conversations]
    encoded = [tokenizer(t, return_tensors="pt", add_special_tokens=False) for t in texts]
    with torch.no_grad():
        want = [model(**e).logits.float() for e in encoded]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            t0 = time.perf_counter()
            path = export.write_gguf(model, tokenizer, Path(tmp) / export.file_name(fmt), fmt)
            seconds = time.perf_counter() - t0
            back = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32).eval()
            max_abs = max_ref = diff2 = ref2 = 0.0
            agree = total = 0
            with torch.no_grad():
                for e, w in zip(encoded, want):
                    g = back(**e).logits.float()
                    max_abs, max_ref = max(max_abs, (g - w).abs().max().item()), max(max_ref, w.abs().max().item())
                    diff2, ref2 = diff2 + (g - w).pow(2).sum().item(), ref2 + w.pow(2).sum().item()
                    agree += (g.argmax(-1) == w.argmax(-1)).sum().item()
                    total += w.shape[1]
            out[fmt] = {"max_abs_logit_error": round(max_abs, 5), "max_abs_relative": round(max_abs / max_ref, 6),
                        "rms_relative": round((diff2 / ref2) ** 0.5, 6), "greedy_agreement": round(agree / total, 4),
                        "file_mb": round(path.stat().st_size / 2**20, 1), "export_s": round(seconds, 1)}  # fmt: skip
            del back
    print(json.dumps({"benchmark": "gguf_export", "model": what, "prompts": len(texts), "tokens": sum(w.shape[1] for w in want),
                      "params": models.n_params(model), "smoothing_folded": smoothing is not None, "results": out}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
