"""The training stage through the real CLI on a tiny model: accumulation and data parallelism give the
same weights as one big batch, a killed run resumes bit-exactly, LoRA, importance pruning, online KD,
early stopping."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

BASE = {
    "student": {"pruned_from": "teacher", "keep_layers": 2},
    "data": {"n_examples": 60, "layer_weights": {"core": 0.3, "failure": 0.7}, "held_out_functions": 2,
             # a fixed 48 training records: two processes share every row (a row count that is not a multiple of the
             # process count leaves the remainder out of the data-parallel epoch, by design)
             "mixture": {"sources": ["teacher", "reference"], "size": 48}},
    "signals": {"kind": ["sequence", "logit"], "n": 2, "max_new_tokens": 16, "batch_size": 8, "shard_size": 8, "top_k": 8},
    "train": {"epochs": 2, "batch_size": 4, "max_length": 192, "kd_weight": 0.5, "reference_weight": 1.0, "lr": 1e-3},
}  # fmt: skip


def cli(*args, check=True, runner=(sys.executable, "-m", "stillroom.cli")) -> subprocess.CompletedProcess:
    proc = subprocess.run([*runner, *map(str, args)], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir) -> Path:
    """A run whose data stages are done once for the module; each test trains in a copy of it."""
    root = tmp_path_factory.mktemp("training")
    cfg = dict(BASE, run={"name": "base", "dir": str(root / "runs"), "seed": 0}, teacher={"model": str(tiny_model_dir)})
    path = root / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli("mix", path)
    return path


def variant(prepared: Path, name: str, train: dict | None = None, student: dict | None = None) -> tuple[Path, Path]:
    """A copy of the prepared run under ``name`` with train / student settings changed; returns (config, run dir)."""
    cfg = yaml.safe_load(prepared.read_text())
    runs = Path(cfg["run"]["dir"])
    shutil.copytree(runs / "base", runs / name, ignore=shutil.ignore_patterns("train", "eval", "report*"))
    cfg["run"]["name"] = name
    cfg["train"] = {**cfg["train"], **(train or {})}
    cfg["student"] = {**cfg["student"], **(student or {})}
    path = prepared.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, runs / name


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "train" / "model" / "model.safetensors"))


def counts(run: Path) -> dict:
    return json.loads((run / "train" / "manifest.json").read_text())["counts"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_accumulation_and_two_processes_match_one_big_batch(prepared):
    """Global batch 4 three ways: one micro-batch of 4; two accumulated micro-batches of 2; two gloo
    processes with 2 rows each under torchrun. Rows differ in length, so a wrong per-token normalizer
    would move the weights."""
    one, run_one = variant(prepared, "one", {"batch_size": 4, "grad_accum": 1})
    accum, run_accum = variant(prepared, "accum", {"batch_size": 2, "grad_accum": 2})
    ddp, run_ddp = variant(prepared, "ddp", {"batch_size": 2, "grad_accum": 1})
    cli("train", one)
    cli("train", accum)
    cli("train", ddp, runner=(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "-m", "stillroom.cli"))  # fmt: skip
    base = weights(run_one)
    assert counts(run_ddp)["processes"] == 2 and counts(run_ddp)["global_batch"] == 4
    assert counts(run_ddp)["steps"] == counts(run_one)["steps"] == counts(run_accum)["steps"]
    moved = max_diff(base, weights(variant_untrained_reference(run_one)))
    assert moved > 1e-3  # the runs trained: agreement below is not agreement of untouched weights
    assert max_diff(base, weights(run_accum)) < 1e-4 * moved * 100
    assert max_diff(base, weights(run_ddp)) < 1e-4 * moved * 100
    # the data order is the same, and the per-step losses agree
    losses = [[r["loss"] for r in map(json.loads, (run / "train" / "log.jsonl").open()) if "loss" in r] for run in (run_one, run_ddp)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_bf16_mixed_precision_trains_float32_weights_near_the_float32_run(prepared):
    """train.precision: bf16 runs the forward passes under autocast: the weights and the saved model stay
    float32, the run lands near the float32 run (the same data order and steps), yet not on it (the
    matmuls did run in bfloat16)."""
    fp32, run_fp32 = variant(prepared, "fp32", {"batch_size": 4})
    bf16, run_bf16 = variant(prepared, "bf16", {"batch_size": 4, "precision": "bf16"})
    cli("train", fp32)
    cli("train", bf16)
    base, mixed = weights(run_fp32), weights(run_bf16)
    assert {w.dtype for w in mixed.values()} == {torch.float32}
    untrained = weights(variant_untrained_reference(run_fp32))

    def distance(a: dict, b: dict) -> float:  # L2 over all weights: Adam makes single-element maxima noisy
        return sum(float((a[k] - b[k]).pow(2).sum()) for k in a) ** 0.5

    moved, apart = distance(base, untrained), distance(base, mixed)
    assert 0 < apart < 0.05 * moved  # measured: 0.4% on the tiny model
    losses = [[r["loss"] for r in map(json.loads, (run / "train" / "log.jsonl").open()) if "loss" in r] for run in (run_fp32, run_bf16)]
    assert losses[1] != losses[0] and losses[1] == pytest.approx(losses[0], rel=0.05)
    assert losses[1][-1] < losses[1][0]


def variant_untrained_reference(run: Path) -> Path:
    """The same student before training: prune the tiny teacher again, with the run's layers."""
    from stillroom import models

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    teacher, tokenizer = models.load(cfg["teacher"]["model"])
    student, _ = models.prune_depth(teacher, counts(run)["layers"])
    out = run.parent / (run.name + "-untrained")
    models.save(student, tokenizer, out / "train" / "model")
    return out


def test_a_killed_run_resumes_to_bit_identical_weights(prepared):
    settings = {"epochs": 6, "checkpoint_every": 2, "dropout": 0.1, "batch_size": 2}  # dropout: the RNG must resume too
    whole, run_whole = variant(prepared, "whole", settings)
    killed, run_killed = variant(prepared, "killed", settings)
    cli("train", whole)
    proc = subprocess.Popen([sys.executable, "-m", "stillroom.cli", "train", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((run_killed / "train").glob(".checkpoint-*/state.safetensors")) and time.time() < deadline:
        assert proc.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_killed / "train" / "manifest.json").exists()
    cli("train", killed)
    assert counts(run_killed)["resumed_at_step"] >= 2
    a, b = weights(run_whole), weights(run_killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[r for r in map(json.loads, (run / "train" / "log.jsonl").open()) if "loss" in r] for run in (run_whole, run_killed)]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]


def test_lora_trains_only_adapters_and_exports_merged_and_alone(prepared):
    cfg, run = variant(prepared, "lora", {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}})
    cli("train", cfg)
    c = counts(run)
    assert 0 < c["trainable_params"] < c["params"] / 10
    assert (run / "train" / "adapter" / "adapter_model.safetensors").exists()
    merged = weights(run)
    assert not any("lora" in k for k in merged)  # a plain HF folder: eval and serving load it as is
    untrained = weights(variant_untrained_reference(run))
    changed = {k for k in merged if not torch.equal(merged[k], untrained[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_importance_pruning_keeps_the_layers_that_change_the_hidden_state_most(prepared):
    cfg, run = variant(prepared, "importance", {"epochs": 1}, {"prune_by": "importance", "keep_layers": 2})
    cli("train", cfg)
    c = counts(run)
    scores = c["layer_importance"]
    assert len(scores) == 4 and c["prune_by"] == "importance"
    assert c["layers"] == sorted(sorted(range(4), key=lambda i: -scores[i])[:2])


def test_width_pruning_keeps_the_most_active_mlp_channels_of_the_kept_layers(prepared):
    cfg, run = variant(prepared, "narrow", {"epochs": 1}, {"prune_by": "importance", "keep_layers": 3, "keep_intermediate": 40})
    cli("train", cfg)
    c = counts(run)
    assert c["intermediate_size"] == {"teacher": 64, "kept": 40} and len(c["layers"]) == 3
    student = json.loads((run / "train" / "model" / "config.json").read_text())
    assert student["intermediate_size"] == 40 and student["num_hidden_layers"] == 3
    assert all(w.shape[-1] == 40 for k, w in weights(run).items() if k.endswith("down_proj.weight"))


def test_early_stopping_restores_the_best_dev_weights(prepared):
    cfg, run = variant(prepared, "early", {"epochs": 8, "lr": 0.05, "eval_every": 1, "early_stopping_patience": 2,
                                           "warmup_fraction": 0.0})  # fmt: skip
    cli("train", cfg)
    c = counts(run)
    dev = [r for r in map(json.loads, (run / "train" / "log.jsonl").open()) if "dev_loss" in r]
    assert c["early_stopped"] and c["restored_best"]
    assert c["best_dev_loss"] == min(r["dev_loss"] for r in dev)
    assert [r["dev_loss"] > c["best_dev_loss"] for r in dev[-2:]] == [True, True]  # the patience ran out


def test_online_teacher_gives_zero_kd_for_a_student_equal_to_the_teacher(tiny_model_dir):
    """Dense online KD: the teacher's forward over its own rows; a student that is the teacher, on the
    same prompt, has zero divergence, and equals the offline loss on full-vocabulary top-k."""
    from stillroom import generation, models
    from stillroom.examples.toolcall.task import ToolCallTask
    from stillroom.stages.train import collate, completion_loss, encode, teacher_targets

    model, tokenizer = models.load(str(tiny_model_dir))
    task = ToolCallTask()
    examples = task.build_examples(20, {"core": 1.0}, 0, 2)[:3]
    prompts = [generation.render(tokenizer, task.student_messages(e)) for e in examples]
    gens = generation.generate(model, tokenizer, prompts, max_new_tokens=6, top_k=len(tokenizer))
    rows = [encode(tokenizer, p, g.token_ids, 4096, 0.0, (g.topk_ids, g.topk_logprobs), teacher_prompt=p) for p, g in zip(prompts, gens)]
    batch = collate(rows, tokenizer.pad_token_id)
    teacher = teacher_targets(models.decoder_and_head(model), batch)
    with torch.no_grad():
        online = completion_loss(model, batch, teacher, kd_weight=1.0, kd_loss="jsd", kd_coef=0.5, chunk=5)
        offline = completion_loss(model, batch, None, kd_weight=1.0, kd_loss="jsd", kd_coef=0.5, chunk=5, kd_tail="renormalize")
    assert abs(online.item()) < 1e-5
    assert abs(offline.item()) < 1e-3
    other = dict(batch, teacher_input_ids=batch["teacher_input_ids"].roll(1, dims=1))  # a different teacher view
    with torch.no_grad():
        assert completion_loss(model, other, teacher_targets(models.decoder_and_head(model), other), kd_weight=1.0).item() > 1e-3
