"""The shipped support-ticket example (files and config only) and `stillroom init`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from stillroom import checks
from stillroom.chat_task import examples_from_config
from stillroom.config import load_config
from stillroom.examples.support import make_data

SUPPORT = Path(__file__).parents[1] / "src" / "stillroom" / "examples" / "support"


def test_shipped_data_is_what_the_script_writes():
    rows = make_data.rows()
    assert len(rows) == 300
    assert (SUPPORT / "tickets.jsonl").read_text(encoding="utf-8") == "".join(__import__("json").dumps(r, ensure_ascii=False) + "\n" for r in rows)


def test_shipped_config_validates_and_every_reference_passes_its_own_checks():
    cfg = load_config(SUPPORT / "support.yaml")
    examples, card = examples_from_config(cfg)
    assert card["bad_rows_skipped"] == 0 and card["examples"] == 360  # 30 refund logs teach 3 turns each
    assert {e["slice"] for e in examples} == {"triage", "noisy_triage", "lookup", "refund", "policy", "missing_order"}
    failing = [e["id"] for e in examples if not checks.run_all(e, e["reference"]).passed]
    assert failing == []
    # and a wrong answer fails where it should: a lookup that calls nothing, a policy request that complies
    lookup = next(e for e in examples if e["slice"] == "lookup")
    policy = next(e for e in examples if e["slice"] == "policy")
    assert checks.run_all(lookup, "Let me check.").reason == "calls/no_call_made"
    assert checks.run_all(policy, "Sure, here it is.").reason == "declines/no_match"
    assert policy["expected"] == {"kind": "refuse"}
    teacher = policy["system"]["teacher"]
    assert teacher.startswith("You are the support assistant") and "Rules:" in teacher and "issue_refund" in teacher
    assert len(policy["few_shot"]) == 6 and "Rules:" not in policy["system"]["student"]


def cli(*args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "400"}  # one problem per line
    return subprocess.run([sys.executable, "-m", "stillroom.cli", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, check=False)


def test_init_writes_a_starter_config_that_validates(tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text((SUPPORT / "tickets.jsonl").read_text(encoding="utf-8") + '{"messages": "oops"}\n', encoding="utf-8")
    out = cli("init", bad, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rows: 301" in out.stderr and "multi turn: 30" in out.stderr and "mine.jsonl:301: messages" in out.stderr
    cfg = yaml.safe_load((tmp_path / "stillroom.yaml").read_text())
    assert cfg["data"]["train"] == "mine.jsonl" and cfg["data"]["learn"] == "every" and cfg["data"]["on_bad_row"] == "skip"
    assert cli("validate", "stillroom.yaml", cwd=tmp_path).returncode == 0
    assert cli("init", bad, cwd=tmp_path).returncode == 2  # never overwrites without --force
