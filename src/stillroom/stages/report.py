"""Stage `report`: a Markdown report of the run, at ``report/report.md`` and ``<run>/report.md``."""

from __future__ import annotations

import json

from stillroom import atomic
from stillroom.pipeline import STAGE_NAMES
from stillroom.rundir import StageContext, read_manifest
from stillroom.stages.mix import STEPS


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _millions(x) -> str:
    return "remote" if x is None else f"{x / 1e6:.1f}M"


def render(cfg, results: dict, card: dict, mix_card: dict, manifests: dict) -> str:
    models = results["models"]
    t, s = models["teacher"], models["student"]
    lines = [
        f"# stillroom report: `{cfg.run.name}`",
        "",
        f"Task `{cfg.data.task}`, {results['split']} split, {t['examples']} examples, seed {cfg.run.seed}. "
        "Teacher prompted with its few-shot context; student without it (context distillation).",
        "",
        "## Teacher vs student",
        "",
        "| model | task success | format validity | params | weights (MB) | prompt tokens | latency p50 (ms) | latency p95 (ms) | tokens/s (batch) | cost / 1k req |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in (("teacher", t), ("student", s)):
        lines.append(
            f"| {name} | {_pct(m['task_success'])} | {_pct(m['format_validity'])} | {_millions(m['params'])} | "
            f"{m['weight_mb']} | {m['mean_prompt_tokens']} | {m['latency_p50_ms']} | {m['latency_p95_ms']} | "
            f"{m['batch_tokens_per_s']} | {m['cost_per_1k_requests']} |"
        )
    lines += ["", "## Per layer (task success)", "", "| layer | n | teacher | student |", "|---|---|---|---|"]
    for layer, tm in t["per_layer"].items():
        sm = s["per_layer"].get(layer, {})
        lines.append(f"| {layer} | {tm['n']} | {_pct(tm['task_success'])} | {_pct(sm.get('task_success'))} |")
    lines += ["", "## Failure reasons", "", "| reason | teacher | student |", "|---|---|---|"]
    for reason in sorted(set(t["failure_reasons"]) | set(s["failure_reasons"])):
        lines.append(f"| {reason} | {t['failure_reasons'].get(reason, 0)} | {s['failure_reasons'].get(reason, 0)} |")
    lines += ["", "## Data card", "", f"Selection: verifiers {', '.join(card['verifiers'])}; policy `{card['policy']}`.", "",
              "| layer | examples | candidates | passing | kept | rejections (verifier: reason x count) | reference rejections |",
              "|---|---|---|---|---|---|---|"]
    for layer, c in card["per_layer"].items():
        rej = "; ".join(f"{k} x{n}" for k, n in c["rejections"].items()) or "none"
        ref = "; ".join(f"{k} x{n}" for k, n in c["reference_rejections"].items()) or "-"
        lines.append(f"| {layer} | {c['examples']} | {c['candidates']} | {c['passing_candidates']} | {c['selected']} | {rej} | {ref} |")
    if card["reason_examples"]:
        lines += ["", "Rejected outputs, one per reason:", ""]
        for reason, exs in card["reason_examples"].items():
            out = exs[0]["output"].replace("`", "'").replace("|", "\\|").replace("\n", " ")[:120]
            lines.append(f"- `{reason}` ({exs[0]['example_id']}): `{out}`")
    steps = {name: mix_card["steps"][name] for name in STEPS if name in mix_card["steps"]}
    layers = sorted({k for st in steps.values() for k in st["per_layer"]})
    lines += ["", f"Mixture (records per layer after each step; {mix_card['duplicates']['exact']} exact and "
              f"{mix_card['duplicates']['near']} near duplicates, {mix_card['contamination']['records_flagged']} records "
              f"overlapping the eval split, action `{mix_card['contamination']['action']}`):", "",
              "| step | total | " + " | ".join(layers) + " |", "|---|---|" + "---|" * len(layers)]  # fmt: skip
    for name, st in steps.items():
        lines.append(f"| {name} | {st['total']} | " + " | ".join(str(st["per_layer"].get(k, 0)) for k in layers) + " |")
    tr, tcfg = manifests["train"]["counts"], manifests["train"]["config"]["train"]
    objective = f"CE on teacher sequences x{tcfg['sft_weight']}, on references x{tcfg['reference_weight']}"
    if tcfg["kd_weight"] > 0:
        objective += (f", {tcfg['kd_loss']} to the {tcfg['teacher_mode']} teacher x{tcfg['kd_weight']} at T={tcfg['kd_temperature']}"
                      + (f" (top-k tail: {tcfg['kd_tail']})" if tcfg["teacher_mode"] == "offline" else " (dense)"))  # fmt: skip
    lines += ["", "## Training", "",
              f"Objective: {objective}; {'LoRA r=' + str(tcfg['lora']['r']) if tcfg.get('lora') else 'full fine-tuning'} "
              f"({tr['trainable_params']:,} of {tr['params']:,} parameters trained).", "",
              f"{tr['steps']} steps on {tr['train_examples']} records ({json.dumps(tr['records_by_source'])}), "
              f"{tr['processes']} process(es), global batch {tr['global_batch']}; final train loss {tr['final_train_loss']}, "
              f"best dev loss {tr['best_dev_loss']} at step {tr['best_step']}"
              f"{' (weights restored)' if tr['restored_best'] else ''}{', stopped early' if tr['early_stopped'] else ''}; "
              f"{tr['tokens_per_s']} tokens/s. Student origin: "
              f"{json.dumps({k: tr[k] for k in ('pruned_from', 'prune_by', 'layers', 'from') if k in tr})}.", "",
              "## Stage timings", "", "| stage | seconds |", "|---|---|"]
    for name, m in manifests.items():
        lines.append(f"| {name} | {m['timings'].get('total_s')} |")
    lines += ["", f"Versions: {json.dumps(manifests['eval']['versions'])}", ""]
    return "\n".join(lines)


def run(ctx: StageContext) -> None:
    results = json.loads((ctx.inputs["eval"] / "results.json").read_text())
    card = json.loads((ctx.inputs["select"] / "card.json").read_text())
    mix_card = json.loads((ctx.inputs["mix"] / "card.json").read_text())
    manifests = {name: m for name in STAGE_NAMES if (m := read_manifest(ctx.dir.parent / name)) and m.get("status") == "complete"}
    text = render(ctx.cfg, results, card, mix_card, manifests)
    atomic.write_text(ctx.dir / "report.md", text)
    atomic.write_text(ctx.dir.parent / "report.md", text)
    ctx.counts["bytes"] = len(text.encode())
