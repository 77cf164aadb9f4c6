import subprocess
import sys
from pathlib import Path

import pytest

from stillroom.config import ConfigError, PipelineConfig, apply_override, load_config

DEMO = Path(__file__).parents[1] / "src" / "stillroom" / "examples" / "toolcall" / "demo.yaml"


def write(tmp_path, text) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_shipped_demo_config_validates():
    cfg = load_config(DEMO)
    assert cfg.run.name == "demo" and cfg.teacher.model == "default"


def test_override_sets_nested_values_with_yaml_types(tmp_path):
    cfg = load_config(DEMO, ["train.epochs=2", "student.prune_by=evenly_spaced", "student.keep_layers=[0, 5, 29]", "run.name=other"])
    assert cfg.train.epochs == 2 and cfg.student.keep_layers == [0, 5, 29] and cfg.run.name == "other"


def test_override_without_equals_is_reported():
    with pytest.raises(ConfigError, match="FIELD.PATH=VALUE"):
        load_config(DEMO, ["train.epochs"])


def test_three_problems_each_name_field_and_line(tmp_path):
    p = write(
        tmp_path,
        "run:\n  name: x\ntrain:\n  epochz: 2\n  lr: fast\nteacher:\n  model: ./no/such/folder\n",
    )
    with pytest.raises(ConfigError) as e:
        load_config(p)
    problems = e.value.problems
    assert len(problems) == 3, problems
    joined = "\n".join(problems)
    assert f"{p}:4: train.epochz: unknown field; did you mean `epochs`? allowed: epochs, batch_size" in joined
    assert f"{p}:5: train.lr:" in joined and "'fast'" in joined
    assert f"{p}:7: teacher.model: model folder './no/such/folder' does not exist" in joined


def test_bad_override_is_blamed_on_the_command_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["train.epochs=zero"])
    assert e.value.problems[0].startswith("command line: train.epochs:")


def test_unknown_task_and_verifier_are_config_errors(tmp_path):
    p = write(tmp_path, "data:\n  task: nope\n  select:\n    verifiers: [tool_call, nope2]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    joined = "\n".join(e.value.problems)
    assert "data.task: unknown task 'nope'" in joined and "unknown verifier 'nope2'" in joined


def test_student_needs_exactly_one_source(tmp_path):
    p = write(tmp_path, "student:\n  pruned_from: null\n")
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(p)


def test_invalid_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "run:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:\d+: not valid YAML"):
        load_config(p)


def test_apply_override_refuses_to_descend_into_a_value():
    raw = {"train": 3}
    with pytest.raises(ValueError, match="not a section"):
        apply_override(raw, "train.epochs=2")


def test_validate_cli_exits_nonzero_and_never_imports_torch(tmp_path):
    p = write(tmp_path, "train:\n  epochz: 2\n  lr: fast\nteacher:\n  model: ./missing\n")
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from stillroom.cli import app\n"
        f"r = CliRunner().invoke(app, ['validate', {str(p)!r}])\n"
        "print(r.output)\n"
        "assert 'torch' not in sys.modules, 'validate imported torch'\n"
        "sys.exit(r.exit_code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    for field in ("train.epochz", "train.lr", "teacher.model"):
        assert field in out


def test_defaults_form_a_valid_pipeline():
    assert PipelineConfig().student.pruned_from == "teacher"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.teacher_mode=online", "train.kd_weight=1", "teacher.backend=openai", "teacher.url=http://x/v1",
          "student.pruned_from=null", "student.model=default", "student.keep_intermediate=null"], "teacher_mode: online runs the teacher"),
        (["student.prune_by=importance", "student.keep_layers=[0, 3]"], "give keep_layers as a count"),
        (["student.pruned_from=null", "student.model=default", "student.keep_intermediate=512"], "keep_intermediate prunes"),
        (["student.keep_intermediate=0"], "student.keep_intermediate"),
        (["train.kd_weight=1", "signals.top_k=0"], "or use train.teacher_mode: online"),
        (["train.kd_loss=kl"], "forward_kl"),
        (["train.kd_beta=1.0"], "train.kd_beta"),
        (["train.lora.r=0"], "train.lora.r"),
    ],
)
def test_training_options_are_checked_before_anything_loads(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, overrides)
    assert message in "\n".join(e.value.problems)


def test_online_kd_needs_no_stored_top_k():
    cfg = load_config(DEMO, ["train.kd_weight=1", "train.teacher_mode=online", "signals.top_k=0", "train.kd_loss=jsd"])
    assert cfg.train.teacher_mode == "online" and cfg.train.kd_loss == "jsd"
