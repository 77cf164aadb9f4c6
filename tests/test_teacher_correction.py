"""Teacher correction, the unlabelled pool, refusal shaping, the pool-only baseline and the calibrated
confidence choice, through the real CLI on a tiny model built in the test run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stillroom import atomic
from stillroom.models import weights_hash


def run_cli(command: str, cfg: dict, tmp_path: Path) -> Path:
    """Write ``cfg``, run ``stillroom COMMAND`` on it (it must exit 0); returns the run folder."""
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "stillroom.cli", command, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(cfg["run"]["dir"]) / cfg["run"]["name"]


def test_corrected_teacher_feeds_every_later_stage_and_baselines_are_measured(tmp_path, tiny_model_dir):
    cfg = {
        "run": {"name": "c", "dir": str(tmp_path / "runs"), "seed": 0},
        "teacher": {"model": str(tiny_model_dir), "context": "none"},
        "adapt": {"enabled": True, "epochs": 1, "batch_size": 4, "max_length": 256, "train_layers": 1},
        "student": {"pruned_from": "teacher", "keep_layers": 2},
        "data": {"n_examples": 40, "reference_examples": 40, "train_split_labelled": False, "held_out_functions": 2,
                 "layer_weights": {"core": 0.3, "failure": 0.7},
                 "select": {"verifiers": ["tool_call", "no_call", "refusal"], "refusal_shaping": "I can't help with that."},
                 # 40 examples hold out only 2 distinct harmful requests, too few for the count rule (3) to call their shared
                 # refusal boilerplate: the declared refusal_shaping text is policy, so the labelled refusals stay
                 "mixture": {"sources": ["teacher", "reference"]}},
        "signals": {"kind": ["sequence", "logit"], "n": 1, "max_new_tokens": 16, "batch_size": 4, "shard_size": 8, "top_k": 8,
                    "score_references": True},
        "train": {"epochs": 1, "batch_size": 4, "max_length": 256, "reference_weight": 1.0, "kd_weight": 0.5},
        "baseline": {"pool_only": True},
        "eval": {"max_examples": 8, "max_new_tokens": 8, "latency_requests": 1, "confidence": "auto", "fit_temperature": True,
                 "gates": [{"metric": "task_success", "per": "tag", "min": 0.0}]},
    }  # fmt: skip
    run = run_cli("run", cfg, tmp_path)

    # the unlabelled pool reaches no stage with its references; the labelled pool does
    train = atomic.read_jsonl(run / "prepare" / "train.jsonl")
    assert train and not any("reference" in e or "reference_trace" in e for e in train)
    labelled = {e["id"] for e in atomic.read_jsonl(run / "prepare" / "train_reference.jsonl")}
    mixture = atomic.read_jsonl(run / "mix" / "mixture.jsonl")
    refs = [r for r in mixture if r["source"] == "reference" and r["split"] == "train"]
    assert refs and all(r["example_id"] in labelled for r in refs)

    # the corrected teacher: trained on the labelled pool, different weights, and the one every later stage uses
    adapt = json.loads((run / "adapt" / "manifest.json").read_text())["counts"]
    assert adapt["steps"] > 0 and adapt["trainable_params"] < adapt["params"]  # train_layers: 1 freezes the rest
    corrected = run / "adapt" / "model"
    assert weights_hash(str(corrected)) != weights_hash(str(tiny_model_dir))
    assert json.loads((run / "train" / "manifest.json").read_text())["counts"]["pruned_from"] == "adapt"
    teachers = {r["teacher"] for r in __import__("pyarrow.parquet", fromlist=["x"]).read_table(run / "generate" / "shards").to_pylist()}
    assert teachers == {"model"}  # the folder name of adapt/model, not the shipped teacher's

    # refusal shaping: every must-decline prompt without a passing teacher answer got the policy's refusal
    select_card = json.loads((run / "select" / "card.json").read_text())
    shaped = [r for r in atomic.read_jsonl(run / "select" / "selected.jsonl") if r["origin"] == "shaped"]
    assert select_card["refusals_shaped"] == len(shaped) > 0
    assert all(r["text"] == "I can't help with that." for r in shaped)

    # baselines and comparisons in one results file
    results = json.loads((run / "eval" / "results.json").read_text())
    assert {"teacher_shipped", "teacher", "student", "pool_only"} <= set(results["models"])
    n = results["models"]["student"]["metrics"]["task_success"]["n"]
    assert all(m["metrics"]["task_success"]["n"] == n for m in results["models"].values())
    for key in ("deltas_student_vs_pool_only", "deltas_teacher_vs_shipped", "deltas_student_vs_teacher"):
        assert results[key]["all"]["all"]["task_success"]["n"] == n
    choice = results["models"]["student"]["confidence_choice"]
    assert choice["signal"] == min(choice["dev_ece"], key=choice["dev_ece"].get) and results["models"]["student"]["confidence"] == choice["signal"]
    assert "temperature_fit" in results["models"]["student"]
    report = (run / "report.md").read_text()
    assert "## Baselines (paired differences, points)" in report and "| pool_only |" in report and "| teacher_shipped |" in report
    pool = json.loads((run / "baseline" / "manifest.json").read_text())["counts"]
    assert pool["records_by_source"] and set(k.split("/")[1] for k in pool["records_by_source"]) == {"reference"}
    # the pool-only student's references are cleaned on their own: every labelled reference is a source, and the
    # labelled must-decline requests keep their refusals (in `mix` the teacher's identical shaped refusal can win the tie)
    pool_card = json.loads((run / "baseline" / "card.json").read_text())
    pool_refs = [e for e in atomic.read_jsonl(run / "prepare" / "train_reference.jsonl") if e.get("reference") or e.get("reference_trace")]
    dev_refs = [e for e in atomic.read_jsonl(run / "prepare" / "dev.jsonl") if e.get("reference") or e.get("reference_trace")]
    assert pool_card["steps"]["sources"]["total"] == len(pool_refs) + len(dev_refs)
    unsafe = {e["request"] for e in pool_refs if e["slice"] == "unsafe"}
    assert unsafe and pool_card["steps"]["train_after_resample"]["per_slice"].get("failure/unsafe", 0) >= 1
    assert pool["train_records"] == pool_card["steps"]["train_after_resample"]["total"]
    assert pool_card["contamination"]["policy_texts"] == ["I can't help with that."]
    # step-matched (baseline.steps: matched): as many optimizer steps as the distilled student, over its smaller pool
    distilled = json.loads((run / "train" / "manifest.json").read_text())["counts"]
    assert pool["train_records"] < distilled["train_examples"]  # at equal epochs it would take fewer steps
    assert pool["steps"] == pool["steps_matched_to"] == distilled["steps"]

    # requests/s beside tokens/s (benchmarks/served_speed.py): answers over the pass's seconds, new tokens / tokens/s
    bench = Path(__file__).parents[1] / "benchmarks" / "served_speed.py"
    proc = subprocess.run([sys.executable, str(bench), "--run", str(run)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    speed = json.loads(proc.stdout)["models"]
    answers = atomic.read_jsonl(run / "eval" / "outputs.jsonl")
    for label, row in speed.items():
        mine = [r for r in answers if r["model"] == label]
        m = results["models"][label]  # eval records requests/s; new tokens / tokens/s recovers the same pass's seconds
        seconds = sum(r["new_tokens"] for r in mine) / m["tokens_per_s"]
        assert row["examples"] == len(mine) == m["examples"] and row["requests_per_s"] == m["requests_per_s"]
        # the tiny model's pass lasts tens of milliseconds: batch_seconds (4 decimals) and tokens/s (2) are rounded by up to ~0.3% here
        assert m["requests_per_s"] == pytest.approx(len(mine) / seconds, rel=1e-2) and m["requests_per_s"] == pytest.approx(len(mine) / m["batch_seconds"], rel=1e-2)
    assert {"teacher", "student", "pool_only"} <= set(speed) and speed["teacher"]["requests_per_s_ratio"] == 1.0

    # float32 against bfloat16 weights (benchmarks/inference_precision.py), through the eval stage's own pass: the
    # float32 answers are the eval stage's; the bfloat16 difference is paired on the same examples
    bench = Path(__file__).parents[1] / "benchmarks" / "inference_precision.py"
    proc = subprocess.run([sys.executable, str(bench), "--run", str(run), "--models", "teacher", "student", "pool_only",
                           "--examples", str(n)], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    precision = json.loads(proc.stdout)
    assert precision["examples"] == n
    for label, row in precision["models"].items():
        f32, bf16, vs = row["float32"], row["bfloat16"], row["bfloat16_vs_float32"]
        assert f32["task_success"]["mean"] == pytest.approx(results["models"][label]["metrics"]["task_success"]["mean"], abs=1e-4), label
        assert f32["same_as_eval_stage"] == 1.0 and f32["task_success"]["n"] == bf16["task_success"]["n"] == n
        assert 0.0 <= vs["identical_answers"] <= 1.0 and vs["identical_answers"] == pytest.approx(bf16["same_as_eval_stage"], abs=1e-4)
        assert vs["task_success_delta"]["delta"] == pytest.approx(bf16["task_success"]["mean"] - f32["task_success"]["mean"], abs=1e-3)
        assert vs["speedup"] == pytest.approx(f32["seconds"] / bf16["seconds"], rel=0.05)

    # the cascade under a teacher budget (benchmarks/cascade_budget.py), read off the held-out curve
    def cascade_budget(max_share: str) -> dict:
        bench = Path(__file__).parents[1] / "benchmarks" / "cascade_budget.py"
        proc = subprocess.run([sys.executable, str(bench), "--run", str(run), "--max-share", max_share], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    nothing, everything = cascade_budget("0"), cascade_budget("1")
    teacher_success = results["models"]["teacher"]["metrics"]["task_success"]["mean"]
    assert nothing["teacher_task_success"]["mean"] == teacher_success
    for name in ("student", "pool_only"):
        own = results["models"][name]["metrics"]["task_success"]["mean"]
        fails = sum(not r["metrics"]["format_validity"] for r in answers if r["model"] == name) / n
        for signal in ("mean_token_prob", "min_token_prob", "seq_prob"):
            curves = nothing["first_models"][name]["signals"][signal]
            alone, checked = curves["confidence_only"], curves["with_verifier"]
            # no teacher at all: the student's own answers; the verifier alone already sends its format failures
            assert alone["best_within_budget"]["teacher_share"] == 0.0 and alone["best_within_budget"]["task_success"]["mean"] == pytest.approx(own, abs=1e-4)
            assert checked["lowest_share"] == pytest.approx(fails, abs=1e-4) and (checked["best_within_budget"] is None) == (fails > 0)
            full = everything["first_models"][name]["signals"][signal]["confidence_only"]
            # the whole budget: at least the teacher's success (everything escalated), reached at some share <= 1
            assert full["best_within_budget"]["task_success"]["mean"] >= teacher_success - 1e-4 and 0.0 <= full["share_to_reach_teacher"] <= 1.0


def test_on_policy_rounds_score_the_students_own_samples(tmp_path, tiny_model_dir):
    """Signal `on_policy`: each round the student samples answers to the train prompts, the teacher scores
    every position of them (top-k into the store), and the student steps on a divergence to those."""
    import pyarrow.parquet as pq

    cfg = {
        "run": {"name": "op", "dir": str(tmp_path / "runs"), "seed": 0},
        "teacher": {"model": str(tiny_model_dir)},
        "student": {"pruned_from": "teacher", "keep_layers": 2},
        "data": {"n_examples": 24, "held_out_functions": 2, "layer_weights": {"core": 0.3, "failure": 0.7}},
        "signals": {"kind": ["sequence", "on_policy"], "n": 1, "max_new_tokens": 10, "batch_size": 4, "shard_size": 8, "top_k": 4,
                    "on_policy": {"rounds": 2, "temperature": 1.0}},
        "train": {"epochs": 1, "batch_size": 4, "max_length": 256, "on_policy_weight": 1.0, "on_policy_loss": "jsd"},
    }  # fmt: skip
    run = run_cli("train", cfg, tmp_path)
    counts = json.loads((run / "train" / "manifest.json").read_text())["counts"]
    assert counts["on_policy_rounds"] == 2 and counts["on_policy_prompts"] > 0
    rounds = [pq.read_table(run / "train" / "on_policy" / f"round-{r}.parquet").to_pylist() for r in range(2)]
    for r, rows in enumerate(rounds):
        assert len(rows) == counts["on_policy_prompts"] and {row["candidate"] for row in rows} == {r}
        for row in rows:  # the teacher's top-k at each of the student's tokens and at the end-of-turn position
            assert len(row["topk_ids"]) == len(row["token_ids"]) + 1 and all(len(k) == 4 for k in row["topk_ids"])
    # each round samples anew from the student as it is then, with its own seeds
    assert [row["seed"] for row in rounds[0]] != [row["seed"] for row in rounds[1]]
    log = atomic.read_jsonl(run / "train" / "log.jsonl")
    op_steps = [r for r in log if "on_policy_loss" in r]
    assert {r["round"] for r in op_steps} == {0, 1} and all(r["on_policy_loss"] >= 0 for r in op_steps)
    assert max(r["step"] for r in log if "loss" in r) < min(r["step"] for r in op_steps)  # after the main phase


def test_a_registered_cascade_escalates_to_the_corrected_teacher(tmp_path):
    """The served cascade's teacher is the one the run evaluated: the corrected weights in the run (with
    the hash their stage recorded) behind the prompt they were corrected for, not the teacher as shipped."""
    from stillroom.config import PipelineConfig
    from stillroom.registry import served_teacher
    from stillroom.rundir import sha256_file

    run = tmp_path / "runs" / "c"
    (run / "adapt" / "model").mkdir(parents=True)
    (run / "adapt" / "model" / "model.safetensors").write_bytes(b"weights")
    atomic.write_json(run / "adapt" / "manifest.json", {"status": "complete", "outputs": {"model/model.safetensors": sha256_file(run / "adapt" / "model" / "model.safetensors")}})
    cfg = PipelineConfig.model_validate({"teacher": {"context": "none"}, "adapt": {"enabled": True}})
    spec = served_teacher(run, cfg)
    assert spec["model"] == str((run / "adapt" / "model").resolve()) and spec["context"] == "none"
    assert spec["weights_sha256"] == sha256_file(run / "adapt" / "model" / "model.safetensors")
    shipped = served_teacher(run, PipelineConfig.model_validate({}))
    assert shipped["model"] == "default" and "weights_sha256" not in shipped and shipped["context"] == "few_shot"

    from stillroom.serve import _teacher

    (run / "adapt" / "model" / "model.safetensors").write_bytes(b"swapped")
    with pytest.raises(ValueError, match="not the one the version was evaluated with"):
        _teacher(spec)
