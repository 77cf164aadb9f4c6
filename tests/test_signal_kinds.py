"""Every teacher-signal kind through the same stages: preference pairs, tool traces and self-distillation
mixed in one run with per-signal weights, on tiny models built in the test run."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from stillroom.config import ConfigError, PreferenceConfig, load_config
from stillroom.stages.mix import cap_self
from stillroom.stages.prepare import split_for
from stillroom.stages.select import pairs_for

DEMO = Path(__file__).parents[1] / "src" / "stillroom" / "examples" / "toolcall" / "demo.yaml"


def cli(*args, expect=(0, 3)) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "stillroom.cli", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode in expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_pairs_rank_passing_over_failing_and_the_reference_first():
    pref = PreferenceConfig(max_pairs_per_example=3)
    cands = [{"candidate": 0, "text": "a", "passed": False, "lp": -0.2}, {"candidate": 1, "text": "b", "passed": True, "lp": -0.9},
             {"candidate": 2, "text": "c", "passed": False, "lp": -0.1}]  # fmt: skip
    ref = {"candidate": -1, "text": "r", "passed": True, "lp": -1.5}
    pairs = pairs_for(cands, ref, pref)
    assert [(a["text"], b["text"]) for a, b in pairs] == [("r", "c"), ("b", "a")]  # reference first; hardest negative first
    assert pairs_for(cands[:1], None, pref) == []  # nothing passing: no pair
    by_lp = pairs_for(cands, None, PreferenceConfig(rank_by="teacher_logprob", min_margin=0.5))
    assert [(a["text"], b["text"]) for a, b in by_lp] == [("c", "b")]  # 'a' vs 'a' has no margin
    same = [{"candidate": 0, "text": "x ", "passed": True, "lp": 0.0}, {"candidate": 1, "text": "x", "passed": False, "lp": -1.0}]
    assert pairs_for(same, None, pref) == []  # identical after normalization: no signal


def test_self_made_records_are_capped_at_their_share():
    records = [{"id": f"t{i}", "split": "train", "source": "teacher"} for i in range(30)]
    records += [{"id": f"s{i}", "split": "train", "source": "self"} for i in range(50)]
    records += [{"id": f"d{i}", "split": "dev", "source": "self"} for i in range(5)]
    out, note = cap_self(records, 0.25, random.Random(0))
    train_self = [r for r in out if r["split"] == "train" and r["source"] == "self"]
    assert len(train_self) == 10 and note == {"self_records": 10, "dropped": 40, "max_share": 0.25}  # 10 / (30 + 10)
    assert sum(r["split"] == "dev" for r in out) == 5
    assert cap_self(records, 1.0, random.Random(0))[0] == records


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["signals.kind=[sequence]"], "includes `logit` exactly when train.kd_weight > 0"),
        (["signals.kind=[sequence, logit, preference]"], "includes `preference` exactly when train.pref_weight > 0"),
        (["train.trace_weight=1"], "includes `tool_trace` exactly when train.trace_weight > 0"),
        (["signals.kind=[sequence, logit, self]", "train.self_weight=1"], "exactly when signals.self.model"),
        (["signals.kind=[sequence, sequence, logit]"], "distinct kinds"),
        (["signals.kind=[sequence, logit, tweet]"], "signals.kind.2"),
        (["eval.gates=[{metric: task_success, vs: previous, min_ratio: 1.0}]"], "set eval.previous"),
        (["data.reference_examples=50", "data.mixture.sources=[teacher]", "train.reference_weight=0"], "add `reference` to data.mixture.sources"),
    ],
)
def test_signal_kinds_and_their_weights_are_checked_together(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, overrides)
    assert message in "\n".join(e.value.problems)


def test_a_single_kind_may_be_written_as_a_string():
    cfg = load_config(DEMO, ["signals.kind=preference", "train.kd_weight=0", "train.sft_weight=0", "train.pref_weight=1"])
    assert cfg.signals.kind == ["preference"]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("kinds")
    cfg = {
        "run": {"name": "mixed", "dir": str(root / "runs"), "seed": 0},
        "teacher": {"model": str(tiny_model_dir)},
        "student": {"pruned_from": "teacher", "keep_layers": 2},
        "data": {"n_examples": 48, "reference_examples": 24, "layer_weights": {"core": 0.5, "failure": 0.5}, "held_out_functions": 2,
                 "select": {"verifiers": ["tool_call", "no_call", "trace"]}, "mixture": {"sources": ["teacher", "reference"]}},
        "signals": {"kind": ["sequence", "preference", "tool_trace", "self"], "n": 2, "max_new_tokens": 12, "max_tool_steps": 3,
                    "batch_size": 8, "shard_size": 8, "top_k": 4, "score_references": True,
                    "self": {"model": str(tiny_model_dir), "n": 2, "min_teacher_logprob": None, "max_share": 0.2}},
        "train": {"epochs": 1, "batch_size": 4, "max_length": 256, "sft_weight": 1.0, "reference_weight": 1.0, "pref_weight": 0.5,
                  "trace_weight": 1.0, "self_weight": 1.0, "max_steps": 3},
        "eval": {"max_new_tokens": 8, "max_tool_steps": 2, "latency_requests": 1, "previous": str(tiny_model_dir)},
    }  # fmt: skip
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli("run", path)
    return root / "runs" / "mixed"


def test_preference_pairs_come_from_train_and_dev_only(mixed_run):
    pairs = [json.loads(line) for line in (mixed_run / "select" / "pairs.jsonl").open()]
    held_out = {json.loads(line)["id"] for line in (mixed_run / "prepare" / "eval.jsonl").open()}
    seen = {json.loads(line)["id"] for s in ("train", "dev") for line in (mixed_run / "prepare" / f"{s}.jsonl").open()}
    assert pairs and all(p["example_id"] in seen and p["example_id"] not in held_out for p in pairs)
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    # a random tiny teacher writes no valid call: the chosen side of a call example is its clean reference
    assert any(p["chosen_from"] == "reference" for p in pairs)


def test_reference_only_examples_train_by_their_reference_and_never_reach_the_teacher(mixed_run):
    prep = mixed_run / "prepare"
    split_ids = {s: {json.loads(line)["id"] for line in (prep / f"{s}.jsonl").open()} for s in ("train", "dev", "eval")}
    extra = [json.loads(line) for line in (prep / "train_reference.jsonl").open()]
    extra_ids = {e["id"] for e in extra}
    assert extra and not extra_ids & set().union(*split_ids.values())
    assert all(split_for(e, 0.2, 0.1) == "train" and e.get("pinned_split") not in ("eval", "not_train") and (e["reference"] or e["reference_trace"]) for e in extra)
    counts = json.loads((prep / "manifest.json").read_text())["counts"]
    assert counts["train_reference"] == len(extra) and counts["train"] == len(split_ids["train"])
    # the teacher's samples, the self-generated ones and the pairs cover the train and dev prompts only; the
    # labelled pool's clean references are scored teacher-forced (candidate -1) so KD reaches them, nothing sampled
    for stage in ("generate", "self_generate"):
        sampled = [r for f in sorted((mixed_run / stage / "shards").glob("shard-*.parquet")) for r in pq.read_table(f).to_pylist()]
        assert sampled and {r["example_id"] for r in sampled} <= split_ids["train"] | split_ids["dev"]
    scored = pq.read_table(mixed_run / "generate" / "shards" / "references.parquet").to_pylist()
    assert {r["candidate"] for r in scored} == {-1} and {r["example_id"] for r in scored} & extra_ids
    assert not {json.loads(line)["example_id"] for line in (mixed_run / "select" / "pairs.jsonl").open()} & extra_ids
    mixture = [json.loads(line) for line in (mixed_run / "mix" / "mixture.jsonl").open()]
    theirs = [r for r in mixture if r["example_id"] in extra_ids]
    assert theirs and all(r["source"] == "reference" and r["split"] == "train" for r in theirs)
    by_source = json.loads((mixed_run / "train" / "manifest.json").read_text())["counts"]["records_by_source"]
    assert by_source["train/reference"] >= len(theirs)


def test_all_kinds_reach_training_with_their_weights(mixed_run):
    counts = json.loads((mixed_run / "train" / "manifest.json").read_text())["counts"]
    assert counts["pair_rows"] > 0 and counts["trace_rows"] > 0 and counts["steps"] == 3  # train.max_steps
    mix = json.loads((mixed_run / "mix" / "card.json").read_text())
    assert {"pair", "reference"} <= set(mix["sources_in_mixture"])
    cap = mix["self_cap"]
    selected = [json.loads(line) for line in (mixed_run / "select" / "selected.jsonl").open()]
    own = sum(s["origin"] == "self" and s["split"] == "train" for s in selected)
    assert own > 0 and cap["self_records"] + cap["dropped"] <= own  # the cap acts after dedup and decontamination
    others = mix["steps"]["after_contamination"]["total"] - mix["steps"]["dev"]["total"] - own  # lower bound of the rest
    assert cap["self_records"] <= max(0, int(0.2 * (others + own) / 0.8)) + 1
    store = pq.read_table(mixed_run / "self_generate" / "shards").to_pylist()
    train_ids = {json.loads(line)["id"] for line in (mixed_run / "prepare" / "train.jsonl").open()}
    assert {r["example_id"] for r in store} == train_ids and all(r["teacher"].startswith("self:") for r in store)
    assert all(r["teacher_mean_logprob"] is not None for r in store if r["messages"] is None)


def test_eval_measures_the_previous_student_drift_and_the_multi_step_slice(mixed_run):
    results = json.loads((mixed_run / "eval" / "results.json").read_text())
    assert {"teacher", "student", "previous"} <= set(results["models"])
    assert "task_success" in results["deltas_student_vs_previous"]["all"]["all"]
    drift = results["drift_vs_teacher"]["student"]
    assert drift["teacher_mean_new_tokens"] > 0 and drift["length_ratio"] is not None
    rows = [json.loads(line) for line in (mixed_run / "eval" / "outputs.jsonl").open()]
    assert any(r["slice"] == "multi_step" for r in rows)
    report = (mixed_run / "report" / "report.md").read_text()
    assert "multi_step" in report and "Drift" in report


def test_a_retrained_generator_invalidates_self_generation_and_eval(tmp_path, tiny_model_dir):
    """The generating student and eval's previous student live outside the run: their weights' hashes
    join the stages' keys, so retraining the folder (or moving a registry alias) redoes those stages."""
    import shutil

    from safetensors.torch import load_file, save_file

    from stillroom.stages import evaluate, self_generate

    folder = tmp_path / "student"
    shutil.copytree(tiny_model_dir, folder)
    sets = ["signals.kind=[logit, self]", "train.sft_weight=0", "train.self_weight=1", f"signals.self.model={folder}",
            f"eval.previous={folder}"]  # fmt: skip
    cfg = load_config(DEMO, sets)
    before = (self_generate.external(cfg), evaluate.external(cfg))
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v + 1e-3 for k, v in weights.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    after = (self_generate.external(cfg), evaluate.external(cfg))
    assert before[0]["self_model"] != after[0]["self_model"] and before[1]["previous_model"] != after[1]["previous_model"]
    assert self_generate.external(load_config(DEMO)) == {} and evaluate.external(load_config(DEMO)) == {}


def test_a_pair_is_not_a_duplicate_of_the_reference_it_prefers(mixed_run):
    """Deduplication keys a pair on its prompt and both sides: the clean reference (SFT) and the pair that
    prefers it (DPO) both stay in the mixture."""
    records = [json.loads(line) for line in (mixed_run / "mix" / "mixture.jsonl").open()]
    pairs = {r["example_id"] for r in records if r["source"] == "pair" and r["text"] == r["chosen"]}
    refs = {r["example_id"] for r in records if r["source"] == "reference"}
    assert pairs & refs
