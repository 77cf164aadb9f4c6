"""benchmarks/serving.py's plumbing on a tiny finished run (a cascade fitted, a corrected teacher, held-out examples of the
tool-calling task): every row it promises is measured on the same requests. Figures are not checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from finished_runs import make_run

from stillroom import atomic
from stillroom.config import PipelineConfig
from stillroom.engines import llamacpp_available
from stillroom.plugins import registry

ROOT = Path(__file__).resolve().parents[1]


def test_serving_benchmark_measures_every_row_on_a_tiny_run(tmp_path, tiny_model_dir):
    cascade = {"threshold": 0.5, "signal": "mean_token_prob", "verifier": True, "student": "student"}
    run = make_run(tmp_path / "runs", "tiny", 1, True, tiny_model_dir, cascade)
    d = PipelineConfig.model_validate({}).data
    atomic.write_jsonl(run / "prepare" / "eval.jsonl", registry().get("task", "toolcall").build_examples(12, d.layer_weights, 0, 2))
    # a corrected teacher (stage adapt): its own rows, and the cascade escalates to it
    shutil.copytree(tiny_model_dir, run / "adapt" / "model")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["adapt"]["enabled"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    engines = ["torch"] + ([] if llamacpp_available() else ["llamacpp"])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serving.py"), "--run", str(run), "--requests", "3", "--max-tokens", "4",
                           "--engines", *engines], capture_output=True, text=True, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows = {"teacher_with_context", "corrected_teacher", "student", "student_int8", "cascade"}
    if "llamacpp" in engines:
        rows |= {"teacher_with_context_llamacpp", "corrected_teacher_llamacpp", "student_llamacpp_q8_0", "student_llamacpp_q4_0"}
        assert out["results"]["student_llamacpp_q8_0"]["engine"] == "llamacpp"
        assert "student_llamacpp_q4_0_speedup_vs_teacher_llamacpp_p50" in out["ratios"]
    assert set(out["results"]) == rows and out["requests"] == 3
    assert all({"p50_ms", "p95_ms", "requests_per_s", "task_success"} <= set(r) for r in out["results"].values())
    assert "student_int8_speedup_vs_corrected_teacher_requests_per_s" in out["ratios"]
