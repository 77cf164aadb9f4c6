"""The real CLI, end to end, on a tiny model built in the test run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stillroom.config import DEFAULT_GATES

STAGES = ["prepare", "adapt", "generate", "self_generate", "select", "mix", "train", "baseline", "compress", "eval", "report"]


@pytest.fixture
def config(tmp_path, tiny_model_dir) -> Path:
    cfg = {
        "run": {"name": "a", "dir": str(tmp_path / "runs"), "seed": 0},
        "teacher": {"model": str(tiny_model_dir)},
        "student": {"pruned_from": "teacher", "keep_layers": 2},
        # a random tiny teacher never writes a tool call, so the examples that must not call a tool
        # are the ones whose candidates pass the tool-call verifier: weight the mixture towards them
        "data": {"n_examples": 40, "layer_weights": {"core": 0.3, "failure": 0.7}, "held_out_functions": 2},
        "signals": {"kind": ["sequence", "logit"], "n": 2, "max_new_tokens": 24, "batch_size": 4, "shard_size": 2, "top_k": 8,
                    "score_references": True},
        "train": {"epochs": 1, "batch_size": 4, "max_length": 256, "kd_weight": 0.5},
        # the default gates plus one a random tiny student cannot pass: `run` must exit 3 after the report
        "compress": {"quantize": "int8_dynamic"},
        "route": {"enabled": True, "max_teacher_share": 0.5},
        "eval": {"max_examples": 6, "max_new_tokens": 12, "latency_requests": 2,
                 "gates": [g.model_dump(exclude_none=True) for g in DEFAULT_GATES] + [{"metric": "task_success", "min": 0.5, "name": "planted"}]},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args, check=True, expect=0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "stillroom.cli", *map(str, args)], capture_output=True, text=True)
    if check:
        assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


GATES_FAILED = 3


def manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())


def records(run: Path) -> list[dict]:
    rows = []
    for shard in sorted((run / "generate" / "shards").glob("shard-*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    return rows


def test_run_skip_force_and_a_loadable_student(config, tmp_path):
    run = tmp_path / "runs" / "a"
    first = cli("run", config, expect=GATES_FAILED)  # the planted gate fails; the report is still written
    assert "gates failed" in first.stderr and "planted" in first.stderr
    for stage in STAGES:
        assert manifest(run, stage)["status"] == "complete"
    report = (run / "report.md").read_text()
    assert "| teacher |" in report and "| student |" in report and "## Per layer" in report and "## Per slice" in report
    assert "## Data card" in report and "after_contamination" in report and "**Verdict: FAIL**" in report
    verdict = json.loads((run / "eval" / "verdict.json").read_text())
    planted = next(g for g in verdict["gates"] if g["name"] == "planted")
    assert not verdict["passed"] and not planted["passed"] and planted["rows"][0]["threshold"] == 0.5
    assert verdict["model"] == json.loads((run / "eval" / "results.json").read_text())["served"] == "student_int8"  # the form that ships
    assert "judged on `student_int8`" in report
    for g in verdict["gates"]:
        assert all({"value", "threshold", "passed"} <= set(r) for r in g["rows"])

    # nothing selected fails the tool-call verifier, re-checked from the stored files
    from stillroom.examples.toolcall.task import no_call, tool_call

    examples = {json.loads(x)["id"]: json.loads(x) for s in ("train", "dev") for x in (run / "prepare" / f"{s}.jsonl").open()}
    selected = [json.loads(x) for x in (run / "select" / "selected.jsonl").open()]
    assert selected
    for r in selected:
        assert tool_call()(examples[r["example_id"]], {"text": r["text"]}).passed
        assert no_call()(examples[r["example_id"]], {"text": r["text"]}).passed
    card = json.loads((run / "select" / "card.json").read_text())
    assert sum(sum(c["rejections"].values()) for c in card["per_layer"].values()) > 0
    results = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert results["student"]["params"] < results["teacher"]["params"]
    assert results["teacher"]["mean_prompt_tokens"] > results["student"]["mean_prompt_tokens"]  # the context
    assert results["teacher"]["latency_p50_ms_without_context"] > 0  # the same requests timed without it
    assert results["student"]["peak_memory_mb"] is not None and 0 <= results["student"]["ece"] <= 1
    assert manifest(run, "compress")["counts"]["quantized_linear_layers"] == 2 * 7 + 1  # every Linear, the head included
    recipe = json.loads((run / "compress" / "recipe.json").read_text())  # smoothing on by default: its scales and both errors
    assert (run / "compress" / recipe["smoothing"]["file"]).exists() and recipe["calibration_rows"] > 0
    assert set(recipe["logit_rel_error"]) == {"int8", "smoothed_int8"} and all(v > 0 for v in recipe["logit_rel_error"].values())
    assert results["student_int8"]["metrics"]["task_success"]["n"] == results["student"]["metrics"]["task_success"]["n"]
    assert set(manifest(run, "eval")["timings"]) >= {f"{label}_s" for label in results}  # where the eval's time went, per model
    everything = json.loads((run / "eval" / "results.json").read_text())
    cascade = everything["cascade"]
    assert 0 <= cascade["eval"]["teacher_share"] <= 1 and cascade["dev_examples"] > 0
    # within the teacher budget on dev, unless even the smallest share overspends it
    assert cascade["max_teacher_share"] == 0.5 and cascade["within_budget_on_dev"] == (cascade["dev"]["teacher_share"] <= 0.5)
    assert cascade["within_budget_on_dev"] or cascade["dev"]["teacher_share"] == min(p["teacher_share"] for p in cascade["dev_curve"])
    assert "within a teacher budget of 50.0%" in (run / "report.md").read_text()
    # benchmarks/cascade_budget.py refits the stored dev curve under a budget: under this run's own, the eval stage's fit
    bench = Path(__file__).parents[1] / "benchmarks" / "cascade_budget.py"
    proc = subprocess.run([sys.executable, str(bench), "--run", str(run), "--max-share", "0.5"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refit = json.loads(proc.stdout)["dev_fit_within_budget"]
    assert (refit["threshold"], refit["dev"], refit["eval"]) == (cascade["threshold"], cascade["dev"], cascade["eval"])
    assert "latency_p50_ratio" in everything["speed_student_int8_vs_student"]
    assert set(results["student"]["per_slice"]) == {r["slice"] for r in map(json.loads, (run / "eval" / "outputs.jsonl").open())}

    # the store opens with any Arrow tool, compact types included
    import pyarrow as pa
    import pyarrow.dataset as ds

    store = ds.dataset(run / "generate" / "shards", format="parquet").to_table()
    assert store.schema.field("topk_ids").type == pa.list_(pa.list_(pa.uint16()))
    assert store.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16()))
    refs = pq.read_table(run / "generate" / "shards" / "references.parquet").to_pylist()
    assert refs and all(r["candidate"] == -1 and len(r["topk_ids"]) == len(r["token_ids"]) + 1 for r in refs)
    assert all(len(row) == 8 for r in refs for row in r["topk_ids"])

    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(run / "train" / "model", use_safetensors=True)
    assert student.config.num_hidden_layers == 2

    finished = {s: manifest(run, s)["finished"] for s in STAGES}
    again = cli("run", config, expect=GATES_FAILED)
    assert again.stderr.count("up to date") == len(STAGES), again.stderr
    assert {s: manifest(run, s)["finished"] for s in STAGES} == finished

    forced = cli("run", config, "--force", "train", expect=GATES_FAILED)
    skipped = [s for s in STAGES if f"{s}: up to date" in forced.stderr]
    # without a pool-only student (baseline.pool_only: false here) `baseline` reads nothing of `train`: a new student leaves it
    assert skipped == ["prepare", "adapt", "generate", "self_generate", "select", "mix", "baseline"], forced.stderr

    bad = cli("run", config, "--force", "nosuchstage", check=False)
    assert bad.returncode == 2 and "unknown stage" in bad.stderr

    # the registry takes the real run: every stage consistent with config.yaml, the verdict recomputed (the planted gate fails)
    reg = tmp_path / "registry"
    registered = cli("registry", "register", run, "-r", reg)
    assert "(gates FAILED)" in " ".join(registered.stderr.split()), registered.stderr
    assert "v1" in cli("registry", "list", "-r", reg).stdout
    from stillroom import registry

    (version,) = registry.versions(reg)
    assert version["verdict"] == verdict and version["serving"]["quantize"] == "int8_dynamic" and version["serving"]["smoothing"]
    assert cli("registry", "promote", "v1", "-r", reg, check=False).returncode == 2
    # a stage re-run with other settings after eval: config.yaml no longer describes the trained model
    cli("prepare", config, "train.lr=0.5")
    stale = cli("registry", "register", run, "-r", reg, check=False)
    assert stale.returncode == 2 and "so every stage matches" in " ".join(stale.stderr.split()), stale.stderr

    # eval.dtype: the teacher and the float student run in bfloat16 (read off their weights), the int8 student around
    # its float32 rest; only eval and report run again
    float_results = json.loads((run / "eval" / "results.json").read_text())
    assert all("dtype" not in m for m in float_results["models"].values())
    halved = cli("eval", config, "eval.dtype=bfloat16", expect=GATES_FAILED)
    assert [s for s in STAGES if f"{s}: up to date" in halved.stderr] == STAGES[:-2], halved.stderr
    models = json.loads((run / "eval" / "results.json").read_text())["models"]
    assert {label: m["dtype"] for label, m in models.items()} == {"teacher": "bfloat16", "student": "bfloat16", "student_int8": "float32"}


def test_run_killed_during_generate_resumes_without_lost_or_duplicate_records(config, tmp_path):
    cli("generate", config)  # uninterrupted reference, run "a"
    reference = records(tmp_path / "runs" / "a")

    run_b = tmp_path / "runs" / "b"
    proc = subprocess.Popen(
        [sys.executable, "-m", "stillroom.cli", "run", str(config), "run.name=b"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not list((run_b / "generate").glob(".partial-*/shard-*.parquet")):
        assert proc.poll() is None, "generate finished before it could be interrupted"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_b / "generate" / "manifest.json").exists()
    assert not (run_b / "generate" / "shards").exists()  # nothing a later run would trust

    cli("run", config, "run.name=b", expect=GATES_FAILED)
    m = manifest(run_b, "generate")
    assert m["counts"]["shards_resumed"] >= 1
    resumed = records(run_b)
    keys = [(r["example_id"], r["candidate"]) for r in resumed]
    assert len(keys) == len(set(keys)) == m["counts"]["candidates"]
    differing = [(a["example_id"], a["candidate"], sorted(k for k in a if a[k] != b[k])) for a, b in zip(reference, resumed) if a != b]
    assert resumed == reference, f"{len(differing)} rows differ (example, candidate, fields): {differing[:5]}; generate's counts {m['counts']}"
    assert manifest(run_b, "report")["status"] == "complete"


def test_every_command_documents_itself():
    from typer.testing import CliRunner

    from stillroom.cli import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    for command in ["validate", "run", "demo", *STAGES]:
        assert command in top.output
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.output and len(sub.output) > 200, command


def test_html_report_renders_in_headless_chromium_with_gates_and_every_chart(config, tmp_path):
    """The HTML report opened by a real browser: the gate table is on the page and every chart decoded
    (the page's own onload script counts decoded images), and the screenshot is not blank."""
    import shutil as sh

    browser = sh.which("chromium") or sh.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (make test installs it where apt is available)")
    cli("run", config, expect=GATES_FAILED)
    page = tmp_path / "runs" / "a" / "report" / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--hide-scrollbars"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-charts-drawn="4"' in dom and 'data-charts="4"' in dom, dom[:500]  # quality/latency, reliability, slices, cascade
    assert '<table id="gates">' in dom and "planted" in dom and "FAIL" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, "--window-size=1280,5000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    non_white = (pixels < 0.95).any(axis=-1).mean()
    teacher_blue = ((abs(pixels[..., 0] - 0x4C / 255) < 0.06) & (abs(pixels[..., 1] - 0x72 / 255) < 0.06)
                    & (abs(pixels[..., 2] - 0xB0 / 255) < 0.06)).sum()  # fmt: skip
    assert non_white > 0.02 and teacher_blue > 200  # text and tables drawn, and the charts' teacher series
