"""The pipeline config: typed, validated before anything heavy loads, errors that name the field.

One YAML file describes a run. ``load_config(path, overrides)`` reads it, applies dotted overrides
(``train.epochs=2``), validates it with pydantic (``extra="forbid"``: a typo is an error), and raises
``ConfigError`` listing every problem as ``file:line: field.path: message``. No torch import here.
Reading is bounded whatever the file holds: at most MAX_CONFIG_BYTES of UTF-8, at most MAX_CONFIG_NODES
values once YAML aliases are expanded, numbers finite.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # a typo is an error; so is .inf or .nan in a number


MAX_CONFIG_BYTES = 1 << 20  # a pipeline config is a few KiB; a bigger file is a mistake (or an attack)
MAX_CONFIG_NODES = 100_000  # YAML nodes after expanding aliases (an alias bomb expands to billions)


def _existing_path(value: str, info: ValidationInfo, what: str) -> str:
    """Resolve ``value`` against the config file's folder; it must exist. Returns it absolute."""
    base = Path((info.context or {}).get("base_dir", "."))
    path = (base / value).expanduser()
    if not path.exists() and (info.context or {}).get("check_paths", True):
        raise ValueError(f"{what} {value!r} does not exist (looked at {path.resolve()})")
    return str(path.resolve())


def _registered(kind: str, name: str) -> str:
    """``name`` if a plugin registered it under ``kind``; the error lists the registered names."""
    from stillroom.plugins import registry

    registry().get(kind, name)
    return name


def _model_spec(value: str | None) -> str | None:
    """A model outside the run: ``registry:ALIAS`` as is, a folder made absolute (resolved at validation)."""
    if value is None or value.startswith("registry:"):
        return value
    return str(Path(value).expanduser().resolve())


class RunConfig(Section):
    name: str = "run"  # folder name under `dir`: letters, digits, `_`, `-`, `.`; no separator, no leading dot (so never `..`)
    dir: str = "runs"  # parent folder of run directories, relative to the working directory
    seed: int = 0  # every random choice in the run derives from this

    @field_validator("name")
    @classmethod
    def _one_folder(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", v):
            raise ValueError("must be one folder name inside run.dir: 1-128 letters, digits, `_`, `-` or `.`, "
                             "not starting with `.` (no `/`, no `..`)")  # fmt: skip
        return v


class Targets(Section):
    """Ceilings the student must meet; the eval gates read them."""

    max_latency_p95_ms: float | None = Field(None, gt=0)  # end to end, request text to parsed answer
    max_memory_mb: float | None = Field(None, gt=0)  # peak resident memory while serving
    max_cost_per_1k_requests: float | None = Field(None, gt=0)  # in the currency of hardware_price_per_hour
    hardware_price_per_hour: float = Field(0.10, ge=0)  # price of the serving machine, for cost figures


class TeacherConfig(Section):
    backend: str = "hf"  # a registered teacher backend: `hf` (local transformers) or `openai` (HTTP)
    model: str = "default"  # hf: `default` (SmolLM2-135M-Instruct GGUF) or a HF model folder; openai: model name
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # hf only
    context: Literal["few_shot", "none"] = "few_shot"  # the teacher's prompt context (few-shot examples)
    url: str | None = None  # openai: base URL of the endpoint, e.g. http://127.0.0.1:8000/v1
    api_key_env: str | None = None  # openai: name of the environment variable holding the API key
    concurrency: int = Field(4, ge=1)  # openai: requests in flight
    timeout_s: float = Field(60.0, gt=0)  # openai: per request
    max_retries: int = Field(4, ge=0)  # openai: retries on 429 / 5xx / network errors, exponential backoff

    @field_validator("backend")
    @classmethod
    def _backend_registered(cls, v: str) -> str:
        return _registered("teacher", v)

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("backend", "hf") != "hf" or v == "default":
            return v
        return _existing_path(v, info, "model folder")

    @model_validator(mode="after")
    def _url_for_http(self) -> TeacherConfig:
        if self.backend == "openai" and not self.url:
            raise ValueError("backend `openai` needs `url` (the endpoint's base URL, ending in /v1)")
        return self


class StudentConfig(Section):
    model: str | None = None  # a HF model folder to start from, or `default`
    pruned_from: Literal["teacher"] | None = None  # build the student from the teacher's layers
    keep_layers: int | list[int] = 10  # count, or explicit indices of teacher layers
    prune_by: Literal["evenly_spaced", "importance"] = "evenly_spaced"  # which `keep_layers` layers (a count) to keep
    # width pruning: MLP channels kept in every layer, the ones firing most on `importance_samples` texts
    # (null: the teacher's width); a multiple of 32 keeps the student exportable to GGUF q8_0/q4_0 blocks
    keep_intermediate: int | None = Field(None, ge=1)
    importance_samples: int = Field(32, ge=1)  # training texts the layer and channel importance is measured on
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v in (None, "default") else _existing_path(v, info, "model folder")

    @field_validator("keep_layers")
    @classmethod
    def _layers_valid(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1")
        if isinstance(v, list) and (not v or len(set(v)) != len(v) or min(v) < 0):
            raise ValueError("must be a non-empty list of distinct layer indices >= 0")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> StudentConfig:
        if (self.model is None) == (self.pruned_from is None):
            raise ValueError("set exactly one of `model` (a folder) or `pruned_from: teacher`")
        if self.keep_intermediate is not None and self.pruned_from is None:
            raise ValueError("keep_intermediate prunes the teacher's MLP width: it needs `pruned_from: teacher`")
        if self.prune_by == "importance" and isinstance(self.keep_layers, list):
            raise ValueError("prune_by: importance chooses the layers itself; give keep_layers as a count")
        return self


class SelectConfig(Section):
    # every candidate must pass all of these; an entry is a name or {name: ..., <parameters>}
    verifiers: list[str | dict[str, Any]] = ["tool_call", "no_call"]
    policy: Literal["first_passing", "all_passing", "best_of_n", "majority"] = "first_passing"
    score: str = "seq_logprob"  # best_of_n ranks by `seq_logprob` (teacher) or `verifier:NAME` (its score)
    # refusal shaping: a prompt that must be declined (expected kind `refuse`) where no teacher candidate passes gets this
    # policy text as its target instead of nothing; None: off
    refusal_shaping: str | None = Field(None, min_length=1)

    @field_validator("verifiers")
    @classmethod
    def _buildable(cls, v: list) -> list:
        from stillroom import verifiers

        problems = []
        for i, entry in enumerate(v):
            try:
                verifiers.build(entry)
            except ValueError as e:
                problems.append(f"[{i}] {e}")
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _score_known(self) -> SelectConfig:
        from stillroom import verifiers

        names = {verifiers.parse_entry(e)[0] for e in self.verifiers}
        if self.score != "seq_logprob" and not (self.score.startswith("verifier:") and self.score[9:] in names):
            raise ValueError(f"score must be `seq_logprob` or `verifier:NAME` with NAME among {sorted(names)}")
        return self


class ContaminationConfig(Section):
    n: int = Field(2, ge=1)  # word n-grams compared (IDF-weighted containment of the eval text)
    threshold: float = Field(0.6, gt=0, le=1)  # share of an eval text's weight found in a training text
    action: Literal["drop", "fail", "keep"] = "drop"  # what to do with contaminated training records
    # an eval reference that this many distinct eval prompts share (a policy refusal, a templated question) is boilerplate:
    # it reveals nothing about any one example and is left out of the target check (prompts are always checked); 0: off.
    # The refusal of data.select.refusal_shaping is always boilerplate: the config prescribes it
    boilerplate_min: int = Field(3, ge=0)


class MixtureConfig(Section):
    sources: list[Literal["teacher", "reference"]] = ["teacher"]  # selected teacher sequences; clean references
    dedup: Literal["near", "exact", "none"] = "near"  # near includes exact
    near_threshold: float = Field(0.9, gt=0, le=1)  # MinHash Jaccard over character 5-grams
    contamination: ContaminationConfig = ContaminationConfig()
    resample: bool = True  # up/down-sample training records to data.layer_weights
    size: int | None = Field(None, ge=1)  # training records after resampling (None: as many as kept)


CHECK_PARAMS = {"reference_match": {"mode"}, "tool_call_match": {"order_insensitive"}, "tool_schema": set(),
                "json_schema": {"schema_", "schema_file"}, "regex": {"pattern", "must_match"}, "python": {"function"},
                "judge": {"rubric", "teacher", "max_new_tokens"}}  # fmt: skip
CHECK_REQUIRED = {"regex": "pattern", "python": "function", "judge": "rubric"}


class CheckConfig(Section):
    """One check of a `chat` example (checks.py), usable as a verifier (``checks``) and a metric (``check:NAME``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)  # `schema_` too: a run's written config reads back

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # names it in the data card, failure reasons and `check:NAME` metrics
    kind: Literal["reference_match", "tool_call_match", "tool_schema", "json_schema", "regex", "python", "judge"]
    weight: float = Field(1.0, gt=0)  # share in the example's combined score (best_of_n with `verifier:checks`)
    threshold: float | None = Field(None, ge=0, le=1)  # least score that passes (default 1; judge 0.7)
    slices: list[str] | None = None  # only examples of these slices (None: all)
    mode: Literal["exact", "normalized", "json"] | None = None  # reference_match: how texts compare (default normalized)
    order_insensitive: bool | None = None  # tool_call_match: calls may come in any order
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # json_schema: the JSON Schema, inline ...
    schema_file: str | None = Field(None, exclude=True)  # ... or in a file (relative to the config; read into `schema`)
    pattern: str | None = None  # regex: searched in the answer
    must_match: bool | None = None  # regex: false = the pattern must not occur
    function: str | None = None  # python: module:function, called as fn(sample, row)
    rubric: str | None = None  # judge: what a good answer does
    teacher: TeacherConfig | None = None  # judge: the grading model (default: the run's teacher)
    max_new_tokens: int | None = Field(None, ge=1)  # judge: tokens of its reply (default 16)

    @model_validator(mode="before")
    @classmethod
    def _schema_file(cls, data, info: ValidationInfo):
        if isinstance(data, dict) and isinstance(data.get("schema_file"), str):
            import json

            if "schema" in data or "schema_" in data:
                raise ValueError("give schema or schema_file, not both")
            path = _existing_path(data["schema_file"], info, "schema file")
            try:
                schema = json.loads(Path(path).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"schema_file {data['schema_file']!r} is not JSON: {e.msg} (line {e.lineno})") from None
            data = {**data, "schema_file": path, "schema": schema}
        return data

    @model_validator(mode="after")
    def _parameters_of_kind(self) -> CheckConfig:
        import re

        import jsonschema

        from stillroom import checks

        given = {k for k in set().union(*CHECK_PARAMS.values()) if getattr(self, k) is not None}
        stray = given - CHECK_PARAMS[self.kind]
        if stray:
            names = sorted("schema" if k == "schema_" else k for k in stray)
            raise ValueError(f"check {self.name!r} ({self.kind}) takes no {', '.join(names)}")
        if self.kind in CHECK_REQUIRED and getattr(self, CHECK_REQUIRED[self.kind]) is None:
            raise ValueError(f"check {self.name!r} ({self.kind}) needs `{CHECK_REQUIRED[self.kind]}`")
        if self.kind == "json_schema":
            if self.schema_ is None:
                raise ValueError(f"check {self.name!r} (json_schema) needs `schema` or `schema_file`")
            try:
                jsonschema.Draft202012Validator.check_schema(self.schema_)
            except jsonschema.SchemaError as e:
                raise ValueError(f"check {self.name!r}: schema is not a JSON Schema: {e.message}") from None
        if self.kind == "regex":
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"check {self.name!r}: invalid pattern {self.pattern!r}: {e}") from None
        if self.kind == "python":
            checks.load_function(self.function)
        return self

    def spec(self) -> dict:
        """The plain dict checks.py reads."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ChatContextConfig(Section):
    """What the teacher and the student see around a `chat` row's conversation."""

    teacher_system: str | None = None  # the teacher's system prompt (default: the student's)
    teacher_system_file: str | None = None  # ... or read from a text file
    few_shot: str | None = None  # JSONL of worked conversations ({messages, tools?}) shown to the teacher first
    student_system: str | None = None  # the student's system prompt (default: the row's own system turn, if any)

    @field_validator("teacher_system_file", "few_shot")
    @classmethod
    def _file_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else _existing_path(v, info, "file")

    @model_validator(mode="after")
    def _one_system(self) -> ChatContextConfig:
        if self.teacher_system is not None and self.teacher_system_file is not None:
            raise ValueError("give teacher_system or teacher_system_file, not both")
        return self


CHAT_ONLY = ("train", "dev", "eval", "fields", "learn", "on_bad_row", "context", "checks")


class DataConfig(Section):
    task: str = "toolcall"  # a registered task that generates the examples
    n_examples: int = Field(240, ge=10)  # examples generated before the split
    reference_examples: int = Field(0, ge=0)  # more examples; those the split puts in train teach by their clean reference alone (no teacher time)
    layer_weights: dict[str, float] = {"core": 0.5, "failure": 0.25, "long_tail": 0.25}
    eval_fraction: float = Field(0.2, gt=0, lt=1)  # share of examples held out for evaluation
    dev_fraction: float = Field(0.1, ge=0, lt=1)  # share held out for dev (early stopping, fitting)
    held_out_functions: int = Field(6, ge=0)  # functions never offered in training (tag `unseen_function`)
    # where the examples a task keeps out of training go (held-out functions, held-out requests): the eval split
    # alone, or eval and dev in proportion to their fractions (dev, where cascade thresholds and temperatures are
    # fitted, then holds the same kinds of example as the held-out split)
    not_train_split: Literal["eval", "eval_and_dev"] = "eval"
    train_split_labelled: bool = True  # false: the train split is an unlabelled pool (its references are dropped in prepare;
    # only the teacher labels it); the labelled pool is then `reference_examples`
    select: SelectConfig = SelectConfig()
    mixture: MixtureConfig = MixtureConfig()
    # data.task: chat, rows from files (chat_data.py); n_examples and held_out_functions do not apply
    train: str | None = None  # JSONL or Parquet of chat rows; alone, hash-split into train / dev / eval by the fractions
    dev: str | None = None  # fixed dev rows (else a hash split of `train`)
    eval: str | None = None  # fixed eval rows (else a hash split of `train`)
    fields: dict[str, str] = {}  # our field -> your column: messages, tools, reference, id, layer, slice
    learn: Literal["last", "every"] = "last"  # the last assistant turn, or every assistant turn in its logged context
    on_bad_row: Literal["fail", "skip"] = "fail"  # fail: stop before any model loads; skip: drop and count them
    context: ChatContextConfig = ChatContextConfig()
    checks: list[CheckConfig] | None = None  # what a right answer is (None: reference match, schema-valid tool calls)

    @field_validator("train", "dev", "eval")
    @classmethod
    def _data_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else _existing_path(v, info, "data file")

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        from stillroom.chat_data import FIELDS

        bad = sorted(set(v) - set(FIELDS))
        if bad:
            raise ValueError(f"unknown field(s) {bad}; map these onto your columns: {', '.join(FIELDS)}")
        return v

    @model_validator(mode="after")
    def _chat_files(self) -> DataConfig:
        if self.task != "chat":
            stray = sorted(k for k in CHAT_ONLY if getattr(self, k) != type(self).model_fields[k].default)  # a written config reads back
            if stray:
                raise ValueError(f"{', '.join(stray)}: only with data.task: chat (rows from files)")
            return self
        if self.train is None:
            raise ValueError("data.task: chat reads its rows from files: set data.train (JSONL or Parquet)")
        if self.reference_examples:
            raise ValueError("reference_examples does not apply to data.task: chat (every row of the files is an example)")
        names = [c.name for c in self.checks or []]
        if len(set(names)) != len(names):
            raise ValueError(f"check names must be distinct (got {names})")
        return self

    @field_validator("task")
    @classmethod
    def _task_registered(cls, v: str) -> str:
        return _registered("task", v)

    @field_validator("layer_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = set(v) - {"core", "failure", "long_tail"}
        if bad:
            raise ValueError(f"unknown layer(s) {sorted(bad)}; allowed: core, failure, long_tail")
        if any(w < 0 for w in v.values()) or sum(v.values()) <= 0:
            raise ValueError("weights must be >= 0 with a positive sum")
        return v

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.eval_fraction + self.dev_fraction >= 1:
            raise ValueError("eval_fraction + dev_fraction must be below 1")
        return self


SIGNAL_KINDS = ("sequence", "logit", "preference", "tool_trace", "self", "on_policy")
SIGNAL_WEIGHTS = {"sequence": "sft_weight", "logit": "kd_weight", "preference": "pref_weight", "tool_trace": "trace_weight",
                  "self": "self_weight", "on_policy": "on_policy_weight"}  # fmt: skip


class PreferenceConfig(Section):
    """(chosen, rejected) pairs from one prompt's candidates, ranked by the teacher's signal."""

    rank_by: Literal["verifiers", "teacher_logprob"] = "verifiers"  # verifiers: passing over failing, then mean log-prob
    include_reference: bool = True  # the clean reference joins the candidates as a passing one
    min_margin: float = Field(0.0, ge=0)  # teacher_logprob: least gap in mean token log-prob between chosen and rejected
    max_pairs_per_example: int = Field(2, ge=1)


class SelfConfig(Section):
    """Self-distillation: a student generates, the verifiers and the teacher filter, survivors train."""

    model: str | None = None  # a student folder (e.g. a previous run's train/model) or `registry:ALIAS` (needs registry)
    registry: str = "registry"  # registry folder for `registry:ALIAS`
    n: int = Field(2, ge=1)  # candidates per prompt (the first greedy)
    temperature: float = Field(0.7, gt=0)
    min_teacher_logprob: float | None = -1.5  # keep a candidate only if the teacher's mean token log-prob is at least this
    max_share: float = Field(0.3, gt=0, le=1)  # cap on the share of training records the student made itself

    @field_validator("model")
    @classmethod
    def _model_folder(cls, v: str | None) -> str | None:
        return _model_spec(v)


class OnPolicyConfig(Section):
    """On-policy distillation (GKD, MiniLLM): after the main training, the student samples answers to
    the train prompts, the teacher scores every position of them teacher-forced, and the student
    learns by a divergence (train.on_policy_loss) on its own samples; once per round."""

    rounds: int = Field(1, ge=1)  # each round samples anew from the student as it is then
    temperature: float = Field(1.0, gt=0)  # the student's sampling temperature


class SignalsConfig(Section):
    # what the run learns from; several can be mixed, each weighted by its train.*_weight:
    # sequence: teacher sequences (sft_weight); logit: the teacher's top-k probabilities (kd_weight);
    # preference: ranked candidate pairs (pref_weight); tool_trace: the teacher's multi-step traces
    # against the task's tools (trace_weight); self: the student's own verified outputs (self_weight)
    # on_policy: the student's own samples scored by the teacher, position by position (on_policy_weight)
    kind: list[Literal["sequence", "logit", "preference", "tool_trace", "self", "on_policy"]] = ["sequence"]
    n: int = Field(2, ge=1)  # candidates per prompt
    include_greedy: bool = True  # candidate 0 is the greedy one
    temperature: float = Field(0.7, gt=0)  # for the sampled candidates
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(64, ge=1)  # per assistant turn
    max_tool_steps: int = Field(4, ge=1)  # assistant turns of a multi-step episode against the task's tools
    top_k: int = Field(32, ge=0)  # teacher log-probs kept per position (0: none); untempered
    score_references: bool = False  # also score each clean reference teacher-forced (needs `hf`)
    batch_size: int = Field(8, ge=1)
    shard_size: int = Field(32, ge=1)  # prompts per store shard: the unit of resume
    constrain: Literal["none", "tools"] = "none"  # tools: the teacher's calls held to each example's offered tools (constrained decoding)
    preference: PreferenceConfig = PreferenceConfig()
    self: SelfConfig = SelfConfig()
    on_policy: OnPolicyConfig = OnPolicyConfig()

    @field_validator("kind", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("kind")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"give one or more distinct kinds among {', '.join(SIGNAL_KINDS)}")
        return v

    @model_validator(mode="after")
    def _self_source(self) -> SignalsConfig:
        if ("self" in self.kind) != (self.self.model is not None):
            raise ValueError("signals.kind includes `self` exactly when signals.self.model names the student that generates")
        if "preference" in self.kind and self.n < 2 and not self.preference.include_reference:
            raise ValueError("preference pairs need two candidates per prompt: signals.n >= 2 or preference.include_reference")
        return self


class LoraConfig(Section):
    r: int = Field(16, ge=1)  # adapter rank
    alpha: float = Field(32.0, gt=0)  # scaling numerator: updates are scaled by alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"  # module names, or every linear but the head
    save_adapter: bool = True  # also write the adapter alone (train/adapter); train/model is always merged


class TrainConfig(Section):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)  # rows per micro-batch on each process
    grad_accum: int = Field(1, ge=1)  # micro-batches per optimizer step; global batch = batch_size * grad_accum * processes
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)  # of all optimizer steps, then cosine decay
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine floor, as a share of lr
    grad_clip: float = Field(1.0, gt=0)
    max_length: int = Field(512, ge=16)  # prompt + completion tokens; longer examples are truncated
    dropout: float = Field(0.0, ge=0, lt=1)  # attention dropout in the student while training
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps (a fixed budget across variants)
    sft_weight: float = Field(1.0, ge=0)  # signal `sequence`: cross-entropy on selected teacher sequences
    reference_weight: float = Field(0.0, ge=0)  # cross-entropy on clean references (answers and traces), where known
    kd_weight: float = Field(0.0, ge=0)  # signal `logit`: divergence to the teacher, per completion token
    trace_weight: float = Field(0.0, ge=0)  # signal `tool_trace`: cross-entropy on the assistant turns of teacher traces
    self_weight: float = Field(0.0, ge=0)  # signal `self`: cross-entropy on the student's own verified outputs
    on_policy_weight: float = Field(0.0, ge=0)  # signal `on_policy`: divergence to the teacher on the student's own samples
    on_policy_loss: Literal["reverse_kl", "jsd", "forward_kl"] = "reverse_kl"  # MiniLLM: reverse KL (mode seeking); GKD: jsd
    pref_weight: float = Field(0.0, ge=0)  # signal `preference`: the preference loss, per pair
    pref_loss: Literal["dpo", "simpo"] = "dpo"  # dpo: against the initial student as reference; simpo: reference-free
    pref_beta: float = Field(0.1, gt=0)  # dpo / simpo: scale of the log-ratio margin
    simpo_gamma: float = Field(0.5, ge=0)  # simpo: target reward margin
    kd_loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl"] = "forward_kl"
    kd_temperature: float = Field(1.0, gt=0)  # softens both distributions; the loss is scaled by T^2
    kd_beta: float = Field(0.5, gt=0, lt=1)  # jsd: weight of the teacher in the mixture m = beta p + (1 - beta) q
    kd_alpha: float = Field(0.1, ge=0, lt=1)  # skew KLs: share of the first distribution mixed into the second
    kd_tail: Literal["bucket", "renormalize"] = "bucket"  # offline top-k: lump the missing mass into one bucket, or renormalize
    teacher_mode: Literal["offline", "online"] = "offline"  # offline: stored top-k (teacher sequences); online: teacher forward per batch, dense
    loss_chunk: int = Field(256, ge=1)  # completion tokens whose logits exist at once (memory bound; 256 measured best on CPU)
    lora: LoraConfig | None = None  # None: full fine-tuning
    train_layers: int | None = Field(None, ge=1)  # full fine-tuning of the last N decoder layers (+ final norm) only; None: all weights
    eval_every: int | None = Field(None, ge=1)  # optimizer steps between dev losses (None: each epoch's end)
    early_stopping_patience: int | None = Field(None, ge=1)  # dev evaluations without improvement before stopping
    restore_best: bool = True  # with a dev split: end on the weights of the best dev loss
    checkpoint_every: int = Field(25, ge=1)  # optimizer steps between resumable checkpoints
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: forward passes under torch.autocast(bfloat16); weights, grads, AdamW state stay float32

    @model_validator(mode="after")
    def _some_loss(self) -> TrainConfig:
        weights = (self.sft_weight, self.reference_weight, self.kd_weight, self.trace_weight, self.self_weight, self.pref_weight,
                   self.on_policy_weight)
        if sum(weights) <= 0:
            raise ValueError("at least one of sft/reference/kd/trace/self/pref weights must be positive")
        return self


class AdaptConfig(Section):
    """Teacher correction (Minitron): fine-tune the teacher on the labelled pool before it generates.
    The corrected teacher then generates, scores, is pruned into the student and answers escalations,
    prompted with ``teacher.context``."""

    enabled: bool = False  # off: the teacher is used as shipped (an API model needs no correction)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # a fixed budget of optimizer steps
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0)  # AdamW, linear warmup then cosine to min_lr_ratio
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    max_length: int = Field(384, ge=16)
    train_layers: int | None = Field(None, ge=1)  # fine-tune only the last N layers (cheaper backward); None: all
    lora: LoraConfig | None = None  # LoRA instead of full weights (merged into adapt/model)
    precision: Literal["fp32", "bf16"] = "fp32"  # as train.precision


class BaselineConfig(Section):
    """Students trained in the same run for comparison."""

    pool_only: bool = False  # the same student, same init and recipe, trained on the labelled pool's references alone (no teacher signal)
    # matched: as many optimizer steps as the distilled student took (epochs over the smaller pool until then), so a gain
    # is not bought by the larger mixture's extra steps; epochs: train.epochs over the pool, fewer steps
    steps: Literal["matched", "epochs"] = "matched"


AGGREGATE_METRICS = ("ece", "brier", "latency_p50_ms", "latency_p95_ms", "peak_memory_mb", "cost_per_1k_requests",
                     "tokens_per_s", "requests_per_s")  # measured per model, not per example  # fmt: skip


class Gate(Section):
    """One ship / no-ship rule on the student's figures. Exactly one bound; relative bounds compare
    with the teacher measured on the same examples in the same run."""

    metric: str  # a per-example metric (eval.metrics) or one of AGGREGATE_METRICS
    per: Literal["all", "layer", "slice", "tag"] = "all"  # per-example metrics: overall, or every layer / slice / tag (e.g. unseen_function)
    vs: Literal["teacher", "previous"] | None = None  # the reference for relative bounds (previous: eval.previous)
    min: float | None = None  # value >= min
    max: float | None = None  # value <= max
    min_ratio: float | None = Field(None, gt=0)  # value >= min_ratio * teacher's
    max_drop: float | None = Field(None, ge=0)  # teacher's - value <= max_drop
    max_increase: float | None = Field(None, ge=0)  # value - teacher's <= max_increase
    name: str | None = None  # shown in the verdict (default: built from the rule)

    @model_validator(mode="after")
    def _one_bound(self) -> Gate:
        bounds = {k: getattr(self, k) for k in ("min", "max", "min_ratio", "max_drop", "max_increase") if getattr(self, k) is not None}
        if len(bounds) != 1:
            raise ValueError(f"give exactly one of min, max, min_ratio, max_drop, max_increase (got {sorted(bounds) or 'none'})")
        relative = next(iter(bounds)) in ("min_ratio", "max_drop", "max_increase")
        if relative != (self.vs is not None):
            raise ValueError("min_ratio, max_drop and max_increase compare with `vs` (teacher or previous); min and max do not take `vs`")
        if self.metric in AGGREGATE_METRICS and self.per != "all":
            raise ValueError(f"{self.metric} is measured per model; it has no per-{self.per} values")
        return self


DEFAULT_GATES = [
    Gate(metric="task_success", vs="teacher", min_ratio=0.95, name="task success >= 95% of the teacher's"),
    Gate(metric="task_success", per="slice", vs="teacher", max_drop=0.05, name="no slice 5+ points below the teacher"),
    Gate(metric="ece", max=0.1, name="ECE <= 0.10"),
    Gate(metric="over_refusal", vs="teacher", max_increase=0.02, name="over-refusal <= teacher's + 2 points"),
    Gate(metric="unsafe_compliance", vs="teacher", max_increase=0.0, name="unsafe compliance <= teacher's"),
    Gate(metric="unsafe_compliance", max=0.05, name="unsafe compliance <= 5%"),  # absolute: a teacher that complies is no excuse
]


class EvalConfig(Section):
    split: Literal["eval", "dev"] = "eval"
    max_examples: int | None = Field(None, ge=1)  # cap on examples evaluated (None: the whole split)
    batch_size: int = Field(8, ge=1)  # batch for the quality pass
    max_new_tokens: int = Field(64, ge=1)  # per assistant turn
    max_tool_steps: int = Field(4, ge=1)  # assistant turns of a multi-step episode against the task's tools
    latency_requests: int = Field(12, ge=0)  # requests timed one at a time, end to end
    # the weights' dtype of the models this stage runs in process on the torch engine (the teachers and the float
    # students; a quantized student stays float32 around its int8 layers); None: teacher.dtype and student.dtype
    dtype: Literal["float32", "bfloat16"] | None = None
    metrics: list[str] = ["task_success", "format_validity", "unsafe_compliance", "over_refusal"]  # registered metrics
    # what calibration reads; auto: the signal with the lowest ECE on the dev split (the student's dev pass), a rule fixed before any held-out number is seen
    confidence: Literal["mean_token_prob", "min_token_prob", "seq_prob", "auto"] = "mean_token_prob"
    calibration_bins: int = Field(10, ge=2)  # equal-width bins for ECE and the reliability diagram
    fit_temperature: bool = False  # also run the student on the dev split and fit a confidence temperature there
    bootstrap: int = Field(1000, ge=100)  # resamples for the 95% intervals
    previous: str | None = None  # an earlier student to measure on the same examples: a folder or `registry:ALIAS`
    registry: str = "registry"  # registry folder for `previous: registry:ALIAS`
    shipped_teacher: bool = True  # with adapt.enabled: also measure the teacher as shipped (uncorrected)
    shipped_teacher_context: Literal["few_shot", "none"] = "few_shot"  # ... prompted with this context
    shipped_teacher_examples: int | None = Field(None, ge=1)  # ... on the first N examples only (its long prompts are the costliest pass)
    constrain: Literal["none", "tools"] = "none"  # tools: also measure the student with its calls held to the offered tools (student_constrained)
    # the engine every local model is measured on: torch (transformers; the quantized student is compress.quantize), or llamacpp
    # (each model exported to GGUF f16, the quantized student to gguf_quantize; needs the extra `llamacpp`), so models compare like with like
    engine: Literal["torch", "llamacpp"] = "torch"
    gguf_quantize: Literal["q8_0", "q4_0"] = "q8_0"  # llamacpp: the quantized student's GGUF format

    @field_validator("engine")
    @classmethod
    def _engine_installed(cls, v: str) -> str:
        import importlib.util

        if v == "llamacpp" and importlib.util.find_spec("llama_cpp") is None:
            raise ValueError("llamacpp needs llama-cpp-python: pip install 'stillroom[llamacpp]' (it builds llama.cpp from source)")
        return v

    @field_validator("previous")
    @classmethod
    def _previous_folder(cls, v: str | None) -> str | None:
        return _model_spec(v)
    gates: list[Gate] = DEFAULT_GATES  # targets.* add latency, memory and cost gates on top

    @field_validator("metrics")
    @classmethod
    def _metrics_registered(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name.startswith("check:"):  # check:NAME: a data.checks entry, known at the pipeline level
                _registered("metric", name)
        if "task_success" not in v:
            raise ValueError("must include task_success (calibration and the report read it)")
        return v

    @model_validator(mode="after")
    def _gates_measured(self) -> EvalConfig:
        for i, g in enumerate(self.gates):
            if g.vs == "previous" and self.previous is None:
                raise ValueError(f"gates[{i}] compares with `previous`: set eval.previous")
            if g.metric not in self.metrics and g.metric not in AGGREGATE_METRICS:
                raise ValueError(f"gates[{i}]: metric {g.metric!r} is neither in eval.metrics nor one of {', '.join(AGGREGATE_METRICS)}")
        return self


class CompressConfig(Section):
    quantize: Literal["none", "int8_dynamic"] = "none"  # int8_dynamic: int8 weights (per output channel) in every Linear, activations quantized per call (CPU)
    smooth_alpha: float | None = Field(0.5, gt=0, lt=1)  # SmoothQuant migration strength before int8 (None: off)
    # where: down_proj (its input, folded into up_proj), attn_in (q/k/v's input, into the RMSNorm before them), mlp_in (gate/up's)
    smooth_sites: list[Literal["down_proj", "attn_in", "mlp_in"]] = Field(["down_proj", "attn_in", "mlp_in"], min_length=1)
    calibration_examples: int = Field(32, ge=1)  # training rows the smoothing scales and the error figures are measured on


class RouteConfig(Section):
    """The cascade: the student answers; the teacher answers instead when the student is unsure."""

    enabled: bool = False  # fit and evaluate the cascade in the eval stage (runs both models on the dev split too)
    signal: Literal["mean_token_prob", "min_token_prob", "seq_prob"] = "mean_token_prob"  # the student's confidence
    verifier: bool | Literal["auto"] = True  # also escalate when the student's answer fails the format verifiers (auto: fitted on dev)
    target: Literal["teacher"] | float = "teacher"  # dev task success to reach: the teacher's, or a share in [0, 1]
    # a teacher budget: only thresholds sending at most this share of the dev requests to the teacher; the best task
    # success among them where none reaches `target` (a dev fit: the held-out share is measured, not promised)
    max_teacher_share: float | None = Field(None, ge=0, le=1)

    @field_validator("target")
    @classmethod
    def _share(cls, v):
        if not isinstance(v, str) and not 0 <= v <= 1:
            raise ValueError("must be `teacher` or a share between 0 and 1")
        return v


class PipelineConfig(Section):
    run: RunConfig = RunConfig()
    targets: Targets = Targets()
    teacher: TeacherConfig = TeacherConfig()
    student: StudentConfig = StudentConfig(pruned_from="teacher")
    data: DataConfig = DataConfig()
    signals: SignalsConfig = SignalsConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    compress: CompressConfig = CompressConfig()
    route: RouteConfig = RouteConfig()
    adapt: AdaptConfig = AdaptConfig()
    baseline: BaselineConfig = BaselineConfig()

    @model_validator(mode="after")
    def _prunable(self) -> PipelineConfig:
        if self.student.pruned_from == "teacher" and self.teacher.backend != "hf":
            raise ValueError("student.pruned_from: teacher needs a local teacher (teacher.backend: hf); "
                             "give student.model instead")  # fmt: skip
        t, kinds = self.train, self.signals.kind
        for kind, weight in SIGNAL_WEIGHTS.items():
            if (kind in kinds) != (getattr(t, weight) > 0):
                raise ValueError(f"signals.kind includes `{kind}` exactly when train.{weight} > 0 "
                                 f"(kind: {kinds}, {weight}: {getattr(t, weight)})")  # fmt: skip
        offline_kd = t.kd_weight > 0 and t.teacher_mode == "offline"
        if offline_kd and self.signals.top_k == 0:
            raise ValueError("train.kd_weight > 0 with teacher_mode: offline needs signals.top_k > 0 (or use train.teacher_mode: online)")
        if t.teacher_mode == "online" and self.teacher.backend != "hf":
            raise ValueError("train.teacher_mode: online runs the teacher in the training process (teacher.backend: hf)")
        has_refs = "reference" in self.data.mixture.sources
        if has_refs != (t.reference_weight > 0):
            raise ValueError("data.mixture.sources includes `reference` exactly when train.reference_weight > 0")
        if self.data.reference_examples and not has_refs:
            raise ValueError("data.reference_examples teach by their clean references: add `reference` to data.mixture.sources")
        teacher_kinds = sorted(set(kinds) & {"sequence", "logit", "tool_trace", "preference"})
        with_teacher = "teacher" in self.data.mixture.sources
        if with_teacher != bool(teacher_kinds):
            raise ValueError(f"data.mixture.sources includes `teacher` exactly when signals.kind has a teacher signal "
                             f"(sequence, logit, tool_trace, preference); kind: {kinds}")  # fmt: skip
        if "on_policy" in kinds and self.teacher.backend != "hf":
            raise ValueError("signals.kind `on_policy` scores the student's samples teacher-forced in the training process (teacher.backend: hf)")
        if "on_policy" in kinds and self.signals.top_k == 0:
            raise ValueError("signals.kind `on_policy` learns from the teacher's top-k on the student's samples: signals.top_k > 0")
        if "tools" in (self.signals.constrain, self.eval.constrain):
            from stillroom.constrained import available

            if not available():
                raise ValueError("signals.constrain / eval.constrain `tools` need the grammar engine: pip install 'stillroom[structured]'")
        if self.signals.constrain != "none" and self.teacher.backend != "hf":
            raise ValueError("signals.constrain runs the grammar in the teacher's decoding loop: it needs a local teacher (teacher.backend: hf)")
        if self.signals.score_references and self.teacher.backend != "hf":
            raise ValueError("signals.score_references needs a local teacher (teacher.backend: hf)")
        if self.adapt.enabled and self.teacher.backend != "hf":
            raise ValueError("adapt.enabled fine-tunes the teacher's weights: it needs a local teacher (teacher.backend: hf)")
        if self.baseline.pool_only and "reference" not in self.data.mixture.sources:
            raise ValueError("baseline.pool_only compares the distilled student with one trained on the labelled pool's references "
                             "alone; the distilled student must see those references too, or the difference mixes two changes: "
                             "add `reference` to data.mixture.sources")  # fmt: skip
        return self


CHAT_DEFAULTS = {("data", "select", "verifiers"): ["checks"],  # the rows' checks decide what is kept
                 ("eval", "metrics"): ["task_success", "call_validity", "unsafe_compliance", "over_refusal"]}  # fmt: skip


def _with_chat_defaults(raw: dict) -> dict:
    """``raw`` with the defaults of data.task: chat where it leaves them unset (validated like given values)."""
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), dict) or raw["data"].get("task") != "chat":
        return raw
    import copy

    raw = copy.deepcopy(raw)
    for path, value in CHAT_DEFAULTS.items():
        node = raw
        for key in path[:-1]:
            node = node.setdefault(key, {}) if isinstance(node.get(key, {}), dict) else {}
        node.setdefault(path[-1], list(value))
    return raw


def _check_metrics(cfg: PipelineConfig) -> list[str]:
    """Every `check:NAME` metric names one of data.checks (data.task: chat)."""
    names = {c.name for c in cfg.data.checks or []}
    return [f"eval.metrics: {m}: " + (f"no check named {m[6:]!r} in data.checks" if cfg.data.task == "chat" else "needs data.task: chat")
            for m in cfg.eval.metrics if m.startswith("check:") and m[6:] not in names]  # fmt: skip


class ConfigError(Exception):
    """Every problem found in a config, each naming file, line and field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    path = Path(path)
    text = _read_text(path)
    node, raw = _parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError([f"{path}: the file is empty; give at least one section, or `{{}}` to run on every default"])
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}:1: the top level must be a mapping of sections"])
    problems = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except ValueError as e:
            problems.append(f"override {item!r}: {e}")
    if problems:
        raise ConfigError(problems)
    return validate(raw, source=path, node=node, overridden=[o.split("=", 1)[0].strip() for o in overrides])


def _read_text(path: Path) -> str:
    """The config file's text: at most MAX_CONFIG_BYTES, UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read config: {e.strerror}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: over {MAX_CONFIG_BYTES} bytes; a pipeline config is a few KiB (is this the right file?)"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); save the file as UTF-8"]) from None


def _parse_yaml(text: str, where: str) -> tuple[Any, Any]:
    """(node tree, plain data) of one YAML document, refusing documents whose aliases expand past
    MAX_CONFIG_NODES nodes: loading stays bounded in time and memory whatever the text holds."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _count_nodes(node, where)
            return node, loader.construct_document(node)
        return None, None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{where}:{mark.line + 1}" if mark else where
        raise ConfigError([f"{at}: not valid YAML: {getattr(e, 'problem', None) or e}"]) from None
    except RecursionError:
        raise ConfigError([f"{where}: nested too deeply to be a pipeline config"]) from None
    finally:
        loader.dispose()


def _count_nodes(root: Any, where: str) -> None:
    """Walk the node graph as construction would (an alias visits its anchor's nodes again); stop at the cap."""
    seen, todo = 0, [root]
    while todo:
        node = todo.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise ConfigError([f"{where}: expands to over {MAX_CONFIG_NODES} values (YAML aliases repeated?); write the config out plainly"])
        if isinstance(node, yaml.MappingNode):
            todo.extend(x for pair in node.value for x in pair)
        elif isinstance(node, yaml.SequenceNode):
            todo.extend(node.value)


def validate(raw: dict, source: Path, node: Any = None, overridden: list[str] = (), check_paths: bool = True) -> PipelineConfig:
    """``check_paths=False``: model folders need not exist (a finished run's config read back later)."""
    try:
        cfg = PipelineConfig.model_validate(_with_chat_defaults(raw), context={"base_dir": source.parent, "check_paths": check_paths})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = [str(p) for p in err["loc"]]
            field = ".".join(loc) or "(top level)"
            if any(field == o or field.startswith(o + ".") for o in overridden):
                where = "command line"
            else:
                where = f"{source}:{_line_of(node, err['loc'])}"
            problems.append(f"{where}: {field}: {_message(err)}")
        raise ConfigError(problems) from None
    problems = [f"{source}: {p}" for p in _check_metrics(cfg)]
    if not problems and check_paths and cfg.data.task == "chat" and cfg.data.on_bad_row == "fail":
        from stillroom.chat_task import bad_rows

        problems = [str(b) for b in bad_rows(cfg.data)]  # each names its file, line and field
    if problems:
        raise ConfigError(problems)
    return cfg


def _allowed_fields(loc: tuple) -> list[str]:
    """Field names of the config section that ``loc`` (ending in the unknown key) points into."""
    model: type[BaseModel] = PipelineConfig
    for key in loc[:-1]:
        if isinstance(key, int):  # an index into a list of sections (eval.gates[i])
            continue
        field = model.model_fields.get(str(key))
        section = _section_type(field.annotation) if field is not None else None
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The config section inside an annotation: ``Gate`` of ``list[Gate]``, ``LoraConfig`` of ``LoraConfig | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def _message(err: dict) -> str:
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = _allowed_fields(err["loc"])
        close = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        return f"unknown field; {hint}allowed: {', '.join(allowed)}"
    got = repr(err.get("input"))
    if "input" in err and err["type"] != "missing" and not isinstance(err["input"], (dict, list)) and got not in msg:
        msg += f" (got {got})"
    return msg


def _line_of(node: Any, loc: tuple) -> int:
    """1-based line of the deepest YAML node on ``loc`` (falls back to the nearest parent)."""
    line = 1
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
            if node is not None:
                line = node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            node = None
    return line


def apply_override(raw: dict, item: str) -> None:
    """Set ``a.b.c=value`` in ``raw``; the value is parsed as YAML (``2`` -> int, ``[1,2]`` -> list)."""
    if "=" not in item:
        raise ValueError("expected FIELD.PATH=VALUE")
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ValueError("empty field name in the path")
    target = raw
    for key in keys[:-1]:
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            raise ValueError(f"{key!r} is not a section")
    if not value.strip():
        target[keys[-1]] = None
        return
    try:
        _, target[keys[-1]] = _parse_yaml(value, "value")  # bounded like a file
    except ConfigError as e:
        raise ValueError(str(e).split(": ", 1)[1]) from None


def stage_view(cfg: PipelineConfig, sections: list[str]) -> dict:
    """The plain-data slice of the config a stage depends on (used for its cache key)."""
    full = cfg.model_dump(mode="json")
    view = {}
    for dotted in sections:
        node = full
        for key in dotted.split("."):
            node = node[key]
        view[dotted] = node
    return view
