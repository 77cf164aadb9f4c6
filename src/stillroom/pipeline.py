"""The stage graph and the loop that runs it with caching.

prepare -> adapt -> generate (+ self_generate) -> select -> mix -> train (+ baseline) -> compress -> eval -> report. Each stage is a plain function
``run(ctx)`` in ``stillroom.stages``; this module decides which ones to run: a stage is skipped when
its manifest is complete, its key matches and its files are intact; ``force`` redoes a stage and
everything downstream of it.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml
from rich.console import Console

from stillroom import atomic, distributed
from stillroom.config import PipelineConfig, stage_view
from stillroom.rundir import MANIFEST, RunError, Stage, StageContext, is_fresh, outputs_hash, stage_key, write_manifest

console = Console(stderr=True)


def _stages(cfg: PipelineConfig | None = None) -> list[Stage]:
    """The stages in order; with ``cfg``, each reads only what that config makes it read (without,
    everything it can read)."""
    # imported lazily: stage modules pull in torch, the config path must not
    from stillroom.stages import adapt, baseline, compress, evaluate, generate, mix, prepare, report, select, self_generate, train

    generate_config = ("run.seed", "teacher", *(f"signals.{k}" for k in GENERATE_FIELDS))  # not `kind`: variants share the teacher's signals

    return [
        Stage("prepare", prepare.run, (), ("run.seed", "data"), "build the task's examples and fixed splits", "0.2.0",
              external=prepare.external),
        Stage("adapt", adapt.run, ("prepare",), ("run.seed", "teacher", "adapt"),
              "teacher correction: fine-tune the teacher on the labelled pool", "0.1.0", task=True),
        Stage("generate", generate.run, ("prepare", "adapt"), generate_config, "sample teacher candidates and traces", "0.4.0", task=True),
        Stage("self_generate", self_generate.run, ("prepare", "adapt"), ("run.seed", "teacher", "student.dtype", "signals.self", "signals.top_p",
              "signals.max_new_tokens", "signals.max_tool_steps", "signals.batch_size", "signals.shard_size"),
              "the student samples its own candidates, the teacher scores them (signal `self`)", external=self_generate.external, task=True),
        Stage("select", select.run, ("prepare", "generate", "self_generate"), ("data.select", "signals.preference", "signals.self.min_teacher_logprob"),
              "verify candidates, keep the good, rank pairs", "0.3.1", task=True),
        Stage("mix", mix.run, ("prepare", "select"), ("run.seed", "data.layer_weights", "data.mixture", "data.select.refusal_shaping",
              "signals.kind", "signals.self.max_share"), "dedup, decontaminate, weight the mixture", "0.5.0"),
        Stage("train", train.run, ("prepare", "adapt", "generate", "mix"), ("run.seed", "teacher", "student", "train", "signals.on_policy",
              "signals.max_new_tokens", "signals.top_k", "signals.batch_size"), "train the student",
              "0.4.0", task=True),
        Stage("baseline", baseline.run, baseline.needs(cfg), ("run.seed", "teacher", "student", "train", "baseline",
              "data.layer_weights", "data.mixture", "data.select.refusal_shaping"),
              "the pool-only student: same init, recipe and steps, the labelled pool alone", "0.4.0", task=True),
        Stage("compress", compress.run, ("prepare", "mix", "train"), ("compress", "data.task"),
              "write the student's inference recipe (quantization, smoothing scales)", "0.3.0", task=True),
        Stage("eval", evaluate.run, ("prepare", "adapt", "train", "baseline", "compress"),
              ("run.seed", "teacher", "student.dtype", "eval", "targets", "route"),
              "measure teachers, students (quantized, pool-only, cascade); apply the gates", "0.6.0", evaluate.external, task=True),
        Stage("report", report.run, ("prepare", "adapt", "select", "mix", "train", "baseline", "eval"), ("targets", "eval"),
              "write the run report", "0.4.1"),
    ]


STAGE_NAMES = ("prepare", "adapt", "generate", "self_generate", "select", "mix", "train", "baseline", "compress", "eval", "report")
GENERATE_FIELDS = ("n", "include_greedy", "temperature", "top_p", "max_new_tokens", "max_tool_steps", "top_k", "score_references",
                   "batch_size", "shard_size")  # fmt: skip


def task_fingerprint(name: str) -> str:
    """The task's ``fingerprint()`` (a hash of its prompt context and rules), or its class name: a
    changed few-shot context must redo the teacher's signals, not reuse them."""
    from stillroom.plugins import registry

    task = registry().get("task", name)
    return task.fingerprint() if hasattr(task, "fingerprint") else type(task).__qualname__


def run_dir(cfg: PipelineConfig) -> Path:
    return Path(cfg.run.dir) / cfg.run.name


def effective_teacher(cfg: PipelineConfig, root: Path):
    """The teacher the stages use: as configured, or the corrected one (``adapt/model``) where ``adapt`` runs."""
    if not cfg.adapt.enabled:
        return cfg.teacher
    return cfg.teacher.model_copy(update={"model": str((root / "adapt" / "model").resolve())})


def downstream(stages: list[Stage], names: set[str]) -> set[str]:
    out = set(names)
    for st in stages:  # stages are in topological order
        if out & set(st.needs):
            out.add(st.name)
    return out


def upstream(stages: list[Stage], target: str) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    need, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in need:
            need.add(name)
            todo.extend(by_name[name].needs)
    return [s for s in stages if s.name in need]


def run_pipeline(cfg: PipelineConfig, until: str = "report", force: set[str] = frozenset()) -> Path:
    """Run every stage needed for ``until``; returns the run directory."""
    stages = _stages(cfg)
    unknown = set(force) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"--force: unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGE_NAMES)}")
    root = run_dir(cfg)
    world, main = distributed.world_size(), distributed.is_main()
    distributed.init()  # joins the process group under torchrun; nothing in a world of one
    if main:
        root.mkdir(parents=True, exist_ok=True)
        atomic.write_text(root / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    redo = downstream(stages, set(force))
    for st in upstream(stages, until):
        stage_dir = root / st.name
        inputs = {n: root / n for n in st.needs}
        input_hashes = {n: outputs_hash(p) for n, p in inputs.items()}
        if st.task:  # the task's prompts and checker are code outside the run: their fingerprint
            input_hashes["task"] = task_fingerprint(cfg.data.task)
        if st.external is not None:  # models read from outside the run (a previous student): their weights' hashes
            input_hashes.update(st.external(cfg))
        view = stage_view(cfg, list(st.config))
        key = stage_key(st, view, input_hashes)
        if st.name not in redo and is_fresh(stage_dir, key):
            if main:
                console.print(f"[dim]{st.name}: up to date, skipped ({stage_dir})[/dim]")
            continue
        if world > 1 and st.name != "train":  # under torchrun only the training is data parallel
            raise RuntimeError(f"stage {st.name} is not up to date; run `stillroom {st.name} CONFIG` in one "
                               f"process before training under torchrun")  # fmt: skip
        if main:
            console.rule(f"[bold]{st.name}[/bold]: {st.help}")
            _inside(root, stage_dir)
            _reset(stage_dir, keep_scratch=st.name not in force)
        distributed.barrier()
        ctx = StageContext(name=st.name, dir=stage_dir, cfg=cfg, inputs=inputs, key=key, teacher=effective_teacher(cfg, root))
        started = time.time()
        st.run(ctx)
        if main:
            write_manifest(ctx, view, input_hashes, started)
            console.print(f"{st.name}: done in {time.time() - started:.1f}s {ctx.counts}")
        distributed.barrier()
    return root


def _inside(root: Path, stage_dir: Path) -> None:
    """A stage folder is a real folder of the run: a link to elsewhere would have its target's files deleted."""
    if stage_dir.is_symlink() or (stage_dir.exists() and stage_dir.resolve().parent != root.resolve()):
        raise RunError(f"{stage_dir} is a link to {stage_dir.resolve()}, outside the run; a stage only writes inside "
                       f"{root}: remove the link, then run again")  # fmt: skip


def _reset(stage_dir: Path, keep_scratch: bool) -> None:
    """Untrust a stage before it runs: drop its manifest and outputs; keep resumable scratch
    (hidden folders keyed by the stage's config) unless the stage is forced."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / MANIFEST).unlink(missing_ok=True)
    for p in stage_dir.iterdir():
        if p.name.startswith(".") and keep_scratch:
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()
