"""Constrained decoding on the torch engine: format validity with and without the grammar, and what the
grammar costs per generated token, measured in the same run on the same prompts.

    python benchmarks/constrained_decoding.py                      # a tiny random model built here
    python benchmarks/constrained_decoding.py --run runs/demo      # the run's student on its held-out split
    python benchmarks/constrained_decoding.py --run runs/demo --model runs/demo/adapt/model   # its corrected teacher
    python benchmarks/constrained_decoding.py --model FOLDER [--choice required] [--examples 32]

Prompts: single-turn tool-calling examples (the run's held-out split, or the built-in task's examples),
each rendered as the student sees it; the constraint holds its calls to the example's offered tools
(``--choice auto``: free text or valid calls, the serving default for strict tools; ``required``: one
valid call). A second set asks for a JSON answer under a small fixed schema (``response_format``).
Every prompt is answered greedily one request at a time, free and constrained in alternating order.

Prints JSON per set: format validity (a finished output that meets the constraint) with and without,
task success with and without and the paired change with its 95% bootstrap interval (tool set), time per generated token (prefill included, the same prompt
both ways) and its ratio, and the grammar's compile time (cache cleared, per distinct constraint).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 14}},
          "required": ["city", "unit", "days"], "additionalProperties": False}  # fmt: skip
JSON_PROMPTS = [f"Give the forecast request for {c} as JSON with city, unit and days." for c in
                ("Lisbon", "Oslo", "Kyoto", "Quito", "Accra", "Perth", "Tromsø", "Cusco")]  # fmt: skip


def measure(model, tokenizer, prompts: list[list[dict]], constraints: list[dict], max_tokens: int, judge=None) -> dict:
    from stillroom import constrained, generation, metrics

    passed = {"free": {}, "constrained": {}}  # example -> 1.0 / 0.0, for the paired interval
    out = {m: {"valid": 0, "finished": 0, "tokens": 0, "seconds": 0.0} for m in ("free", "constrained")}
    for i, (messages, c) in enumerate(zip(prompts, constraints)):
        order = ("free", "constrained") if i % 2 == 0 else ("constrained", "free")
        for mode in order:
            t0 = time.perf_counter()
            g = generation.generate(model, tokenizer, [generation.render(tokenizer, messages)], max_new_tokens=max_tokens,
                                    constraints=[c] if mode == "constrained" else None)[0]  # fmt: skip
            seconds = time.perf_counter() - t0
            o = out[mode]
            o["seconds"] += seconds
            o["tokens"] += len(g.token_ids) + int(g.finished)
            o["valid"] += g.finished and constrained.satisfied(c, g.text)
            o["finished"] += g.finished
            passed[mode][str(i)] = float(bool(judge and judge(i, g.text)))
    n = len(prompts)
    per_token = {m: o["seconds"] / max(o["tokens"], 1) for m, o in out.items()}
    compile_ms = []
    for c in {json.dumps(c): c for c in constraints}.values():
        constrained._compiler(tokenizer, model.config.vocab_size).clear_cache()
        t0 = time.perf_counter()
        constrained.compile_for(tokenizer, model.config.vocab_size, c)
        compile_ms.append(1000 * (time.perf_counter() - t0))
    return {
        "prompts": n,
        "format_validity": {m: round(o["valid"] / n, 4) for m, o in out.items()},
        "finished": {m: o["finished"] for m, o in out.items()},  # the rest were cut by max_tokens
        "valid_among_finished": {m: round(o["valid"] / max(o["finished"], 1), 4) for m, o in out.items()},
        **({"task_success": {m: metrics.summary(list(passed[m].values())) for m in out},
            "task_success_change": metrics.paired_delta(passed["free"], passed["constrained"])} if judge else {}),  # constrained - free
        "mean_new_tokens": {m: round(o["tokens"] / n, 1) for m, o in out.items()},
        "ms_per_token": {m: round(1000 * v, 3) for m, v in per_token.items()},
        "per_token_overhead_ratio": round(per_token["constrained"] / per_token["free"], 3),
        "compile_ms_p50": round(statistics.median(compile_ms), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a finished run: its student (train/model) on its held-out split")
    ap.add_argument("--model", help="a model folder (default: a tiny random Llama built here; with --run, instead of its student, "
                                    "e.g. runs/demo/adapt/model for the corrected teacher on the student's prompt)")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--choice", choices=["auto", "required"], default="auto")
    args = ap.parse_args()

    import torch
    import yaml

    from stillroom import constrained, models, tiny_model
    from stillroom.plugins import registry
    from stillroom.stages.prepare import read_split

    if args.run:
        run = Path(args.run)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        task = registry().get("task", cfg["data"]["task"])
        examples = read_split(run / "prepare", cfg["eval"]["split"])
        folder = args.model or str(run / "train" / "model")
    else:
        task = registry().get("task", "toolcall")
        examples = task.build_examples(4 * args.examples, {"core": 0.5, "failure": 0.25, "long_tail": 0.25}, seed=0, held_out_functions=6)
        folder = args.model or str(tiny_model.build(Path(tempfile.mkdtemp(prefix="constrained-")) / "tiny"))
    examples = [e for e in examples if e.get("tools") and e["expected"]["kind"] != "trace"][: args.examples]  # single-turn, with tools
    model, tokenizer = models.load(folder)

    tools = measure(model, tokenizer, [task.student_messages(e) for e in examples],
                    [constrained.for_tools(e["tools"], args.choice) for e in examples], args.max_tokens,
                    judge=lambda i, text: task.check(examples[i], text).passed)  # fmt: skip
    schema = measure(model, tokenizer, [[{"role": "user", "content": p}] for p in JSON_PROMPTS],
                     [{"type": "json_schema", "schema": SCHEMA}] * len(JSON_PROMPTS), args.max_tokens)  # fmt: skip
    print(json.dumps({"model": folder, "threads": torch.get_num_threads(), "max_tokens": args.max_tokens,
                      f"tools_{args.choice}": tools, "json_schema": schema}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
