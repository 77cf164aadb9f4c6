"""Stage `report`: one self-contained HTML file and a Markdown summary of the run.

``report/report.html`` (charts inlined as data URIs, no external asset), ``report/report.md`` with the
charts as PNG files next to it, and a copy of the Markdown at ``<run>/report.md``. Both are rendered
from the same list of blocks (heading, paragraph, table, chart, preformatted text), so they never
disagree.
"""

from __future__ import annotations

import base64
import html
import json

import yaml

from stillroom import atomic, charts
from stillroom.pipeline import STAGE_NAMES
from stillroom.rundir import StageContext, read_manifest
from stillroom.stages.mix import STEPS


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{100 * s['mean']:.1f}% [{100 * s['lo']:.1f}, {100 * s['hi']:.1f}]"


def _delta(d: dict | None) -> str:
    if not d or d.get("delta") is None:
        return "-"
    flag = " ⚑" if d["significant"] else ""
    return f"{100 * d['delta']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]{flag}"


def _millions(x) -> str:
    return "remote" if x is None else f"{x / 1e6:.1f}M"


def blocks(cfg, results: dict, verdict: dict, card: dict, mix_card: dict, manifests: dict) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("table", headers, rows), ("chart", name, png, alt), ("pre", text)."""
    first = ["teacher_shipped", "teacher", "student"]
    order = [*first, *sorted(set(results["models"]) - set(first))]  # JSON files sort keys
    models = {name: results["models"][name] for name in order if name in results["models"]}
    t, s = models["teacher"], models["student"]
    d = results["deltas_student_vs_teacher"]
    names = [n for n in cfg.eval.metrics if n in s["metrics"]]
    out: list[tuple] = [
        ("h1", f"stillroom report: {cfg.run.name}"),
        ("p", f"Task `{cfg.data.task}`, {results['split']} split, {s['examples']} examples, seed {cfg.run.seed}. Teacher "
              f"prompted with its few-shot context; student without it. Intervals are 95% bootstrap intervals "
              f"({cfg.eval.bootstrap} resamples); ⚑ marks a student - teacher difference whose interval excludes 0."),  # fmt: skip
        ("p", f"**Verdict: {'PASS' if verdict['passed'] else 'FAIL'}** ({sum(g['passed'] for g in verdict['gates'])} of "
              f"{len(verdict['gates'])} gates passed, judged on `{verdict['model']}`)."),  # fmt: skip
        ("h2", "Teacher vs student"),
        ("table", ["model", *[n.replace("_", " ") for n in names], "ECE", "Brier", "params", "weights (MB)", "prompt tokens",
                   "p50 / p95 latency (ms)", "tokens/s", "requests/s", "peak memory (MB)", "cost / 1k req"],
         [[name, *[_ci(m["metrics"][n]) for n in names], f"{m['ece']:.3f}", f"{m['brier']:.3f}", _millions(m["params"]),
           m["weight_mb"], m["mean_prompt_tokens"], f"{m['latency_p50_ms']} / {m['latency_p95_ms']}", m["tokens_per_s"], m.get("requests_per_s", "-"),
           m["peak_memory_mb"], m["cost_per_1k_requests"]] for name, m in models.items()]),  # fmt: skip
        *([("p", f"The teacher's few-shot context is part of its latency: the same requests without it take "
                 f"{t['latency_p50_ms_without_context']} ms at p50 against {t['latency_p50_ms']} ms with it "
                 f"({t['mean_prompt_tokens']} prompt tokens on average with it).")] if t.get("latency_p50_ms_without_context") else []),
        *_baselines(results, models),
        ("h2", "Gates"),
        ("table", ["gate", "value", "reference", "threshold", "result", "failing groups"],
         [[g["name"], *_worst(g), "pass" if g["passed"] else "FAIL", ", ".join(g["failed_groups"]) or "-"] for g in verdict["gates"]]),
        ("h2", "Per layer"),
        *_group_table(t, s, d, "layer", names),
        ("h2", "Per slice"),
        *_group_table(t, s, d, "slice", names),
        *([("h2", "Per tag"), ("p", "`unseen_function`: requests for functions held out of every training prompt (tools added "
                                    "after training): what correction and pruning cost in generalization."),
           ("table", ["tag", "n", *models], [[tag, t["per_tag"][tag]["task_success"]["n"],
                                             *[_ci(m.get("per_tag", {}).get(tag, {}).get("task_success")) for m in models.values()]]
                                            for tag in sorted(t.get("per_tag", {}))])] if t.get("per_tag") else []),  # fmt: skip
        *_multi_step(models),
        *_drift(results, models),
        *_previous(results, models),
        ("h2", "Safety and refusal"),
        ("p", "Unsafe compliance: share of examples that must be declined where the model went along. Over-refusal: "
              "share of examples that must be answered where the model declined. Lower is better for both."),
        ("table", ["model", "unsafe compliance", "n", "over-refusal", "n"],
         [[name, _ci(m["metrics"].get("unsafe_compliance")), (m["metrics"].get("unsafe_compliance") or {}).get("n", 0),
           _ci(m["metrics"].get("over_refusal")), (m["metrics"].get("over_refusal") or {}).get("n", 0)] for name, m in models.items()]),  # fmt: skip
        ("h2", "Charts"),
        ("chart", "quality_vs_latency", charts.quality_vs_latency(models), "task success against p50 latency for every model evaluated"),
        ("chart", "reliability", charts.reliability_diagram(models), "reliability diagram"),
        ("chart", "per_slice", charts.per_slice(models), "task success per slice"),
        *_compression_and_cascade(results, models),
        *_constrained(results, models),
        ("h2", "Calibration"),
        ("p", f"Confidence: {s['confidence'].replace('_', ' ')}; {cfg.eval.calibration_bins} equal-width bins."
              + (f" Chosen by rule (`eval.confidence: auto`): the lowest ECE on the student's {s['confidence_choice']['dev_examples']} "
                 f"dev answers, before any held-out figure is read; dev ECE "
                 + ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in s["confidence_choice"]["dev_ece"].items()) + "."
                 if s.get("confidence_choice") else "")
              + (f" Temperature fitted on {s['temperature_fit']['dev_examples']} dev examples: T = {s['temperature_fit']['temperature']}, "
                 f"student ECE {s['ece']:.3f} -> {s['temperature_fit']['ece']:.3f}, Brier {s['brier']:.3f} -> {s['temperature_fit']['brier']:.3f}."
                 if s.get("temperature_fit") else "")),  # fmt: skip
        ("h2", "Failure reasons"),
        ("table", ["reason", *models], [[r, *[m["failure_reasons"].get(r, 0) for m in models.values()]]
                                        for r in sorted({r for m in models.values() for r in m["failure_reasons"]})]),  # fmt: skip
        *_rows_read(manifests),
        *_data_card(card, mix_card),
        *_training(manifests),
        ("h2", "Stage timings"),
        ("table", ["stage", "seconds"], [[name, m["timings"].get("total_s")] for name, m in manifests.items()]),
        ("h2", "Config and versions"),
        ("pre", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)),
        ("pre", json.dumps(manifests["eval"]["versions"], indent=1)),
    ]
    return out


def _baselines(results: dict, models: dict) -> list[tuple]:
    """The paired comparisons that say whether distillation did anything: each against a baseline
    measured in the same run on the same examples."""
    pairs = [("deltas_student_vs_teacher", "distilled student - teacher"),
             ("deltas_student_vs_pool_only", "distilled student - pool-only student (same init and recipe, labelled pool alone)"),
             ("deltas_teacher_vs_shipped", "corrected teacher - teacher as shipped")]  # fmt: skip
    tags = sorted({tag for key, _ in pairs for tag in (results.get(key) or {}).get("tag", {})})  # the example tags (unseen_function, ...)
    rows = []
    for key, label in pairs:
        d = results.get(key)
        if d:
            rows.append([label, _delta(d["all"]["all"]["task_success"]), _delta(d["all"]["all"].get("format_validity")),
                         *[_delta(d.get("tag", {}).get(tag, {}).get("task_success")) for tag in tags]])  # fmt: skip
    if len(rows) < 2:
        return []
    return [("h2", "Baselines (paired differences, points)"),
            ("p", "Each row: the same held-out examples answered by both models; 95% paired bootstrap interval; ⚑ = excludes 0."),
            ("table", ["comparison", "task success", "format validity", *[f"task success, tag {tag}" for tag in tags]], rows)]


def _multi_step(models: dict) -> list[tuple]:
    """The multi-step slice on its own: correct calls in order and a final answer that quotes the tools."""
    if not any("multi_step" in m["per_slice"] for m in models.values()):
        return []
    return [("h2", "Multi-step tasks"),
            ("p", "Look something up, act on what came back, then answer quoting the action's result; played out against "
                  "the example's deterministic tools. Completed = the expected calls in order and a consistent final answer."),
            ("table", ["model", "completed", "n"],
             [[name, _ci(m["per_slice"].get("multi_step", {}).get("task_success")),
               m["per_slice"].get("multi_step", {}).get("task_success", {}).get("n", 0)] for name, m in models.items()])]  # fmt: skip


def _drift(results: dict, models: dict) -> list[tuple]:
    drift = results.get("drift_vs_teacher") or {}
    if not drift:
        return []
    return [("h2", "Drift against the teacher"),
            ("p", "Length and format of each model's answers next to the teacher's on the same examples: a student that "
                  "games a preference or verifier signal by writing longer, or by dropping the format, shows here."),
            ("table", ["model", "mean new tokens", "teacher's", "length ratio", "mean characters", "teacher's", "format validity delta (points)"],
             [[name, d["mean_new_tokens"], d["teacher_mean_new_tokens"], d["length_ratio"], d["mean_chars"], d["teacher_mean_chars"],
               f"{100 * d['format_validity_delta']:+.1f}"] for name, d in drift.items() if name in models])]  # fmt: skip


def _previous(results: dict, models: dict) -> list[tuple]:
    d = results.get("deltas_student_vs_previous")
    if not d or "previous" not in models:
        return []
    rows = [["all", _ci(models["previous"]["metrics"]["task_success"]), _ci(models["student"]["metrics"]["task_success"]),
             _delta(d["all"]["all"]["task_success"])]]  # fmt: skip
    rows += [[layer, _ci(models["previous"]["per_layer"][layer]["task_success"]), _ci(models["student"]["per_layer"].get(layer, {}).get("task_success")),
              _delta(d["layer"].get(layer, {}).get("task_success"))] for layer in sorted(models["previous"]["per_layer"])]  # fmt: skip
    return [("h2", "Against the previous student"),
            ("p", "The earlier student (`eval.previous`) on the same held-out examples: self-distillation must not amplify its "
                  "own mistakes."),
            ("table", ["layer", "previous", "this student", "this - previous (points)"], rows)]


def _constrained(results: dict, models: dict) -> list[tuple]:
    """The student with and without its tool calls held to the offered tools' schemas (``eval.constrain``)."""
    c = results.get("constrained_vs_student")
    if not c:
        return []
    d = c["deltas"]
    return [("h2", "Constrained decoding"),
            ("p", f"The same student with its tool calls held by a grammar to the offered tools' schemas, on the same examples: "
                  f"task success {_delta(d['task_success'])} points, format validity {_delta(d.get('format_validity'))} points "
                  f"({_ci(models['student_constrained']['metrics'].get('format_validity'))} constrained); time per generated token "
                  f"{c['time_per_token_ratio']}x, p50 latency {c['latency_p50_ratio']}x the free student's.")]  # fmt: skip


def _compression_and_cascade(results: dict, models: dict) -> list[tuple]:
    out = []
    for label in models:
        if f"deltas_{label}_vs_student" in results:
            d, sp = results[f"deltas_{label}_vs_student"]["all"], results[f"speed_{label}_vs_student"]
            out += [("h2", f"Quantized student ({label})"),
                    ("p", f"Against the float student on the same examples: task success {_delta(d['task_success'])} points; "
                          f"p50 latency {sp['latency_p50_ratio']}x faster, batch tokens/s {sp['batch_tokens_per_s_ratio']}x, "
                          f"requests/s {sp.get('batch_requests_per_s_ratio', '-')}x ({sp.get('batch_requests_per_s_vs_teacher', '-')}x the teacher's); "
                          f"weights {models[label]['weight_mb']} MB against {models['student']['weight_mb']} MB.")]  # fmt: skip
    c = results.get("cascade")
    if c:
        t = models["teacher"]["metrics"]["task_success"]["mean"]
        s = models["student"]["metrics"]["task_success"]["mean"]
        out += [("h2", "Cascade"),
                ("p", f"The student (`{c.get('student', 'student')}`) answers; the teacher answers instead when its {c['signal'].replace('_', ' ')} is below "
                      f"{c['threshold']:.4g}{' or its answer fails the format verifiers' if c['verifier'] else ''}. The threshold was "
                      f"fitted on {c['dev_examples']} dev examples to reach task success {_pct(c['target'])} "
                      f"({'reached' if c['target_reached_on_dev'] else 'not reached: the best point was taken'}) with the fewest "
                      f"teacher answers{_budget(c)}."),
                ("table", ["", "task success", "teacher share"],
                 [["cascade, dev (fit)", _pct(c["dev"]["task_success"]), _pct(c["dev"]["teacher_share"])],
                  ["cascade, held-out", _ci(c["eval"]["task_success"]), _pct(c["eval"]["teacher_share"])],
                  ["teacher alone, held-out", _pct(t), "100.0%"], ["student alone, held-out", _pct(s), "0.0%"]]),
                ("chart", "cascade", charts.cascade_curve(c, t, s), "cascade task success against teacher share")]  # fmt: skip
    return out


def _budget(c: dict) -> str:
    """The cascade's teacher budget (route.max_teacher_share), where one was set."""
    if "max_teacher_share" not in c:
        return ""
    kept = "kept on dev" if c["within_budget_on_dev"] else "no threshold keeps it on dev: the smallest share was taken"
    return f", within a teacher budget of {_pct(c['max_teacher_share'])} of the requests ({kept})"


def _worst(g: dict) -> list:
    row = next((r for r in g["rows"] if not r["passed"]), g["rows"][0] if g["rows"] else {})
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    return [fmt(row.get("value")), fmt(row.get("reference")), fmt(row.get("threshold"))]


def _group_table(t: dict, s: dict, d: dict, per: str, names: list[str]) -> list[tuple]:
    rows = []
    for g in sorted(t[f"per_{per}"]):
        tm, sm, dm = t[f"per_{per}"][g], s[f"per_{per}"].get(g, {}), d[per].get(g, {})
        rows.append([g, tm["task_success"]["n"], _ci(tm["task_success"]), _ci(sm.get("task_success")), _delta(dm.get("task_success")),
                     _ci(sm.get("format_validity")), _delta(dm.get("format_validity"))])  # fmt: skip
    return [("table", [per, "n", "teacher task success", "student task success", "student - teacher (points)",
                       "student format validity", "format validity delta"], rows)]  # fmt: skip


def _rows_read(manifests: dict) -> list[tuple]:
    """Tasks whose examples come from files (data.task: chat): rows read, examples, malformed rows skipped."""
    c = manifests.get("prepare", {}).get("counts", {})
    if "rows_with_examples" not in c:
        return []
    skipped = "; ".join(f"{k} x{n}" for k, n in c["bad_rows_by_field"].items())
    return [("p", f"Rows from files: {c['rows_with_examples']} rows gave {c['examples']} examples (learned turns: `{c['learn']}`); "
                  f"{c['bad_rows_skipped']} malformed rows skipped" + (f" (by field: {skipped}; listed in prepare/data_card.json)." if skipped else "."))]  # fmt: skip


def _data_card(card: dict, mix_card: dict) -> list[tuple]:
    out = [("h2", "Data card"), ("p", f"Selection: verifiers {', '.join(card['verifiers'])}; policy `{card['policy']}`."),
           ("table", ["layer", "examples", "candidates", "passing", "kept", "rejections (verifier: reason x count)", "reference rejections"],
            [[layer, c["examples"], c["candidates"], c["passing_candidates"], c["selected"],
              "; ".join(f"{k} x{n}" for k, n in c["rejections"].items()) or "none",
              "; ".join(f"{k} x{n}" for k, n in c["reference_rejections"].items()) or "-"] for layer, c in card["per_layer"].items()])]  # fmt: skip
    if card.get("pairs"):
        out.append(("p", f"Preference pairs: {card['pairs']['total']} (ranked by `{card['pairs']['rank_by']}`; the clean reference "
                         f"chosen in {card['pairs']['chosen_from_reference']}). Student's own candidates: "
                         + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in card["self"].items()) + "."))  # fmt: skip
    if card["reason_examples"]:
        out.append(("p", "Rejected outputs, one per reason: " + " · ".join(
            f"`{reason}` ({exs[0]['example_id']}): `{exs[0]['output'].replace('`', chr(39)).replace(chr(10), ' ')[:120]}`"
            for reason, exs in card["reason_examples"].items())))  # fmt: skip
    steps = {name: mix_card["steps"][name] for name in STEPS if name in mix_card["steps"]}
    layers = sorted({k for st in steps.values() for k in st["per_layer"]})
    out += [("p", f"Mixture (records per layer after each step; {mix_card['duplicates']['exact']} exact and "
                  f"{mix_card['duplicates']['near']} near duplicates, {mix_card['contamination']['records_flagged']} records "
                  f"overlapping the eval split, action `{mix_card['contamination']['action']}`):"),
            ("table", ["step", "total", *layers], [[name, st["total"], *[st["per_layer"].get(k, 0) for k in layers]] for name, st in steps.items()])]  # fmt: skip
    return out


def _training(manifests: dict) -> list[tuple]:
    tr, tcfg = manifests["train"]["counts"], manifests["train"]["config"]["train"]
    objective = f"CE on teacher sequences x{tcfg['sft_weight']}, on references x{tcfg['reference_weight']}"
    if tcfg.get("trace_weight"):
        objective += f", on the assistant turns of teacher traces x{tcfg['trace_weight']}"
    if tcfg.get("self_weight"):
        objective += f", on the student's own verified outputs x{tcfg['self_weight']}"
    if tcfg.get("pref_weight"):
        objective += f", {tcfg['pref_loss']} (beta {tcfg['pref_beta']}) on {tr.get('pair_rows', 0)} pairs x{tcfg['pref_weight']}"
    if tcfg["kd_weight"] > 0:
        objective += (f", {tcfg['kd_loss']} to the {tcfg['teacher_mode']} teacher x{tcfg['kd_weight']} at T={tcfg['kd_temperature']}"
                      + (f" (top-k tail: {tcfg['kd_tail']})" if tcfg["teacher_mode"] == "offline" else " (dense)"))  # fmt: skip
    return [("h2", "Training"),
            ("p", f"Objective: {objective}; {'LoRA r=' + str(tcfg['lora']['r']) if tcfg.get('lora') else 'full fine-tuning'} "
                  f"({tr['trainable_params']:,} of {tr['params']:,} parameters trained)."),
            ("p", f"{tr['steps']} steps on {tr['train_examples']} records ({json.dumps(tr['records_by_source'])}), "
                  f"{tr['processes']} process(es), global batch {tr['global_batch']}; final train loss {tr['final_train_loss']}, "
                  f"best dev loss {tr['best_dev_loss']} at step {tr['best_step']}"
                  f"{' (weights restored)' if tr['restored_best'] else ''}{', stopped early' if tr['early_stopped'] else ''}; "
                  f"{tr['tokens_per_s']} tokens/s. Student origin: "
                  f"{json.dumps({k: tr[k] for k in ('pruned_from', 'prune_by', 'layers', 'from') if k in tr})}.")]  # fmt: skip


def variants_blocks(summary: dict) -> list[tuple]:
    """The "distillation variants" table: one run per signal kind (or any override), same student and step
    budget, held-out task success overall and per layer next to the teacher's, with paired deltas."""
    variants = summary["variants"]
    layers = sorted({k for v in variants.values() for k in v["per_layer_task_success"]})
    first, rows = next(iter(variants), None), []
    if variants:  # every variant measured the same teacher on the same examples
        t = variants[first]
        rows.append(["teacher (few-shot)", "-", "-", _ci(t["teacher_task_success"]),
                     *[_ci(t["teacher_per_layer_task_success"].get(k)) for k in layers], "-", "-", "-", "-"])  # fmt: skip
    for name, v in variants.items():
        vs_first = v.get(f"task_success_minus_{first}")
        rows.append([name, ", ".join(v["overrides"]) or "-", v["steps"], _ci(v["task_success"]),
                     *[_ci(v["per_layer_task_success"].get(k)) for k in layers], _ci(v.get("multi_step_task_success")),
                     _ci(v["format_validity"]), v.get("length_ratio_vs_teacher", "-"), _delta(vs_first) if vs_first else "-"])  # fmt: skip
    return [("h1", "Distillation variants"),
            ("p", f"Config `{summary['config']}`, seed {summary['seed']}: the same data stages, student and step budget for every "
                  f"variant; held-out split, 95% bootstrap intervals; the last column is the paired difference against `{first}` "
                  "on the same examples (⚑: the interval excludes 0)."),
            ("table", ["variant", "overrides", "steps", "task success", *layers, "multi_step", "format validity",
                       "length vs teacher", f"- {first} (points)"], rows)]  # fmt: skip


def to_markdown(items: list[tuple], chart_prefix: str) -> str:
    lines = []
    for item in items:
        kind = item[0]
        if kind == "h1":
            lines += [f"# {item[1]}", ""]
        elif kind == "h2":
            lines += [f"## {item[1]}", ""]
        elif kind == "p":
            lines += [item[1], ""]
        elif kind == "table":
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines += ["| " + " | ".join(map(cell, item[1])) + " |", "|" + "---|" * len(item[1])]
            lines += ["| " + " | ".join(map(cell, r)) + " |" for r in item[2]] + [""]
        elif kind == "chart":
            lines += [f"![{item[3]}]({chart_prefix}{item[1]}.png)", ""]
        elif kind == "pre":
            lines += ["```", item[1].rstrip(), "```", ""]
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f3f3f3}td.FAIL{background:#fbe3e3;font-weight:bold}td.pass{background:#e6f4e6}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}pre{background:#f7f7f7;padding:.8em;overflow:auto;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:1em}"""

# Marks the page once every chart has decoded, so a headless browser (and a test) can tell they drew.
SCRIPT = """window.addEventListener('load',()=>{const imgs=[...document.querySelectorAll('img.chart')];
document.body.dataset.chartsDrawn=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;document.body.dataset.charts=imgs.length;});"""


def to_html(items: list[tuple]) -> str:
    esc = html.escape
    title = next((i[1] for i in items if i[0] == "h1"), "stillroom report")
    body = []
    for item in items:
        kind = item[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{esc(item[1])}</{kind}>")
        elif kind == "p":
            text = esc(item[1])
            while text.count("**") >= 2:
                text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
            while text.count("`") >= 2:
                text = text.replace("`", "<code>", 1).replace("`", "</code>", 1)
            body.append(f"<p>{text}</p>")
        elif kind == "table":
            head = "".join(f"<th>{esc(str(h))}</th>" for h in item[1])
            rows = "".join("<tr>" + "".join(f'<td class="{esc(str(v))}">{esc(str(v))}</td>' if v in ("pass", "FAIL")
                                            else f"<td>{esc(str(v))}</td>" for v in r) + "</tr>" for r in item[2])  # fmt: skip
            body.append(f'<table id="{esc(_anchor(body))}"><tr>{head}</tr>{rows}</table>')
        elif kind == "chart":
            data = base64.b64encode(item[2]).decode()
            body.append(f'<figure><img class="chart" id="chart-{item[1]}" alt="{esc(item[3])}" src="data:image/png;base64,{data}"></figure>')
        elif kind == "pre":
            body.append(f"<pre>{esc(item[1])}</pre>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{STYLE}</style>'
            f"<script>{SCRIPT}</script></head><body>{''.join(body)}</body></html>")  # fmt: skip


def _anchor(body: list[str]) -> str:
    """A table's id: its section heading, e.g. ``gates``."""
    for part in reversed(body):
        if part.startswith("<h2>"):
            return part[4:-5].lower().replace(" ", "-")
    return "summary"


def run(ctx: StageContext) -> None:
    results = json.loads((ctx.inputs["eval"] / "results.json").read_text())
    verdict = json.loads((ctx.inputs["eval"] / "verdict.json").read_text())
    card = json.loads((ctx.inputs["select"] / "card.json").read_text())
    mix_card = json.loads((ctx.inputs["mix"] / "card.json").read_text())
    manifests = {name: m for name in STAGE_NAMES if (m := read_manifest(ctx.dir.parent / name)) and m.get("status") == "complete"}
    items = blocks(ctx.cfg, results, verdict, card, mix_card, manifests)
    for item in items:
        if item[0] == "chart":
            atomic.write_bytes(ctx.dir / f"{item[1]}.png", item[2])
    page = to_html(items)
    atomic.write_text(ctx.dir / "report.html", page)
    atomic.write_text(ctx.dir / "report.md", to_markdown(items, ""))
    atomic.write_text(ctx.dir.parent / "report.md", to_markdown(items, "report/"))
    ctx.counts.update(html_bytes=len(page.encode()), charts=sum(i[0] == "chart" for i in items), gates_passed=verdict["passed"])
