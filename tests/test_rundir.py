import json

import pytest

from stillroom import atomic
from stillroom.config import PipelineConfig, stage_view
from stillroom.pipeline import STAGE_NAMES, _stages, downstream, upstream
from stillroom.rundir import Stage, StageContext, hash_outputs, is_fresh, outputs_hash, stage_key, write_manifest


def _noop(ctx):
    pass


STAGE = Stage("s", _noop, (), ("train",), "test stage")


def test_stage_key_changes_with_config_and_inputs_only():
    cfg = PipelineConfig()
    view = stage_view(cfg, ["train"])
    k = stage_key(STAGE, view, {"up": "a"})
    assert k == stage_key(STAGE, stage_view(PipelineConfig(), ["train"]), {"up": "a"})
    assert k != stage_key(STAGE, stage_view(PipelineConfig(train={"epochs": 9}), ["train"]), {"up": "a"})
    assert k != stage_key(STAGE, view, {"up": "b"})
    # a section the stage does not depend on leaves its key alone
    assert k == stage_key(STAGE, stage_view(PipelineConfig(eval={"batch_size": 3}), ["train"]), {"up": "a"})


def test_manifest_makes_a_stage_fresh_and_tampering_makes_it_stale(tmp_path):
    ctx = StageContext("s", tmp_path, PipelineConfig(), {}, key="k1")
    atomic.write_text(tmp_path / "out.txt", "hello")
    assert not is_fresh(tmp_path, "k1")  # no manifest yet: a killed stage is never trusted
    m = write_manifest(ctx, {"x": 1}, {}, started=0.0)
    assert m["status"] == "complete" and m["outputs"] == hash_outputs(tmp_path)
    assert {"torch", "transformers", "python"} <= set(m["versions"])
    assert is_fresh(tmp_path, "k1") and not is_fresh(tmp_path, "k2")
    assert outputs_hash(tmp_path)
    (tmp_path / "out.txt").write_text("changed")
    assert not is_fresh(tmp_path, "k1")


def test_hidden_scratch_is_not_an_output(tmp_path):
    atomic.write_text(tmp_path / ".partial-x" / "shard.parquet", "x")
    atomic.write_text(tmp_path / "a.json", "{}")
    assert list(hash_outputs(tmp_path)) == ["a.json"]


def test_atomic_write_leaves_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "f.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "model"
    with atomic.atomic_dir(target) as d:
        (d / "a").write_text("1")
    with atomic.atomic_dir(target) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_stage_graph_order_and_dependencies():
    stages = _stages()
    assert tuple(s.name for s in stages) == STAGE_NAMES
    assert [s.name for s in upstream(stages, "train")] == ["prepare", "adapt", "generate", "self_generate", "select", "mix", "train"]
    # the pool-only baseline cleans the labelled references itself (its records: test_teacher_correction); from `train`
    # it reads only the distilled student's step count (baseline.steps: matched), so a new mixture redoes it too
    assert downstream(stages, {"select"}) == {"select", "mix", "train", "baseline", "compress", "eval", "report"}
    assert [s.name for s in upstream(stages, "baseline")] == ["prepare", "adapt", "generate", "self_generate", "select", "mix", "train", "baseline"]
    # a corrected teacher redoes everything it feeds: its signals, the pruned students, their evaluation
    assert downstream(stages, {"adapt"}) == set(STAGE_NAMES) - {"prepare"}
    assert downstream(stages, {"eval"}) == {"eval", "report"}


@pytest.mark.parametrize("baseline", [{"steps": "epochs"}, {"pool_only": False}])
def test_a_baseline_that_matches_no_step_count_does_not_read_train(baseline):
    """Only `baseline.steps: matched` reads the distilled student's step count: with fixed epochs, or no
    pool-only student, a new mixture or training leaves the baseline as it was."""
    data = {"mixture": {"sources": ["teacher", "reference"]}}  # a pool-only student needs the distilled one to see the pool too
    common = {"data": data, "train": {"reference_weight": 1.0}}
    matched = PipelineConfig.model_validate({**common, "baseline": {"pool_only": True, "steps": "matched"}})
    other = PipelineConfig.model_validate({**common, "baseline": {"pool_only": True, **baseline}})
    assert "baseline" in downstream(_stages(matched), {"train"})
    stages = _stages(other)
    assert next(s for s in stages if s.name == "baseline").needs == ("prepare", "adapt")
    assert downstream(stages, {"mix"}) == {"mix", "train", "compress", "eval", "report"}
    assert [s.name for s in upstream(stages, "baseline")] == ["prepare", "adapt", "baseline"]


def test_a_changed_prompt_context_changes_the_task_fingerprint(monkeypatch):
    """Generate, select, train and eval carry the task's fingerprint in their keys: editing the teacher's
    worked examples must redo its signals instead of reusing ones made under the old context."""
    from stillroom.examples.toolcall import task as toolcall
    from stillroom.pipeline import task_fingerprint

    before = task_fingerprint("toolcall")
    assert before == task_fingerprint("toolcall")
    monkeypatch.setattr(toolcall, "FEW_SHOT", toolcall.FEW_SHOT[1:])
    assert task_fingerprint("toolcall") != before
    assert {"generate", "train", "eval"} <= {s.name for s in _stages() if s.task}
