"""A finished run's files as the pipeline writes them, without running it: a tiny student, the resolved
config, eval results and the verdict the gates give on them, and a complete manifest for every stage up
to eval. Registry and serving tests start from these; ``running(app)`` serves an app over real HTTP on loopback,
``serving(registry, runs)`` a registry's production alias."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from stillroom import atomic, gates
from stillroom.config import PipelineConfig, stage_view
from stillroom.rundir import StageContext, outputs_hash, write_manifest

GATE = {"metric": "task_success", "min": 0.5, "name": "task success >= 0.5"}


def make_run(root: Path, name: str, seed: int, passed: bool, tokenizer_dir: Path, cascade: dict | None = None) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    run = root / name
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))  # fmt: skip
    model.save_pretrained(run / "train" / "model")
    tokenizer.save_pretrained(run / "train" / "model")
    teacher = {"backend": "hf", "model": str(tokenizer_dir) if cascade else "default", "dtype": "float32"}
    cfg = PipelineConfig.model_validate({"run": {"name": name, "dir": str(root)}, "teacher": teacher, "eval": {"gates": [GATE]}})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    results = {"models": {"student": {
        "metrics": {"task_success": {"mean": 0.9 if passed else 0.2}}, "latency_p50_ms": 10.0, "latency_p95_ms": 20.0, "ece": 0.05,
        "params": 1}}, **({"cascade": cascade} if cascade else {})}  # fmt: skip
    atomic.write_json(run / "eval" / "results.json", results)
    atomic.write_json(run / "eval" / "verdict.json", gates.verdict(results, cfg.eval.gates, cfg.targets))
    seal(run)
    return run


def seal(run: Path) -> None:
    """Write each stage's manifest, as the pipeline does after the stage ran (a folder without outputs gets one file)."""
    from stillroom.pipeline import _stages, upstream
    from stillroom.run_check import read_config

    cfg = read_config(run)
    for st in upstream(_stages(cfg), "eval"):
        folder = run / st.name
        if not folder.exists():
            atomic.write_json(folder / "counts.json", {"stage": st.name})
        inputs = {n: outputs_hash(run / n) for n in st.needs}
        write_manifest(StageContext(st.name, folder, cfg, {}, key="made-by-tests"), stage_view(cfg, list(st.config)), inputs, time.time())


def tree(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file and folder under ``root`` (but ``skip``), with its content hash: equal before and after
    a command means it wrote and deleted nothing there."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or p.is_relative_to(skip)):
            continue
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app):
    """The app on a real uvicorn server on loopback; yields its base URL, stops it (and its watcher) after."""
    import httpx
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    try:
        yield url
    finally:
        if hasattr(app.state, "stop"):
            app.state.stop.set()
        srv.should_exit = True
        thread.join(timeout=10)


@contextmanager
def serving(reg: Path, runs: list[Path], engine: str = "torch"):
    """A registry holding ``runs`` as v1, v2, ... with production on v1, served over real HTTP (the
    watcher polls every 50 ms) on ``engine`` (llamacpp: each version exported to q8_0 first); yields the URL."""
    from stillroom import export, registry
    from stillroom.serve import create_app

    for run in runs:
        v = registry.register(reg, run)
        if engine == "llamacpp":
            export.export_version(reg, v["name"], ["q8_0"])
    registry.promote(reg, "v1")
    with running(create_app(reg, "production", poll_s=0.05, engine=engine)) as url:
        yield url
