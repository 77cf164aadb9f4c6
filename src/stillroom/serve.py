"""The serving endpoint: OpenAI-compatible ``/v1/chat/completions`` for the registry's ``production``
alias, with hot swap, request validation, ``/health`` and ``/metrics`` (FastAPI + uvicorn).

Hot swap: a watcher thread reads the alias every ``poll_s``; when it names another version, the
watcher loads that version beside the serving one and then replaces the server's pointer in one
assignment. A request takes the pointer once, at its start, and finishes on that version even if a
swap happens meanwhile; the old version is freed when its last request ends. Every response names
the version that produced it (``model`` and the ``x-stillroom-version`` header).

Engines (``engines.py``): ``torch`` serves the version's student as registered (int8 when its recipe
says so); ``llamacpp`` serves the version's exported GGUF (``stillroom export``, q8_0 by default). A
cascade's teacher runs on torch either way.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from stillroom.chat_wire import ChatRequest
from stillroom.http_guard import Guard

MAX_BODY_BYTES = 256 * 1024
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")  # /metrics labels; any other path counts as "other"


@dataclass
class Slot:
    """One loaded version (the student, quantized as registered, and for a cascade the teacher).
    Immutable once built; the server swaps whole slots."""

    version: str
    engine: object  # an engines.Engine over the student: torch (as registered) or llamacpp (its GGUF)
    loaded_at: float
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward at a time per model
    cascade: dict | None = None  # threshold, signal, verifier (from the eval stage's fit)
    teacher: tuple | None = None  # (engine, lock), shared across slots
    to_teacher: Callable[[list[dict]], list[dict]] | None = None  # the task's view of a request for the teacher
    render: Callable[[list[dict], list[dict]], list[dict]] | None = None  # (conversation, tools) -> the student's messages


@dataclass(frozen=True)
class Answer:
    text: str
    finished: bool
    prompt_tokens: int
    completion_tokens: int
    served_by: str  # "student" or "teacher"
    confidence: float | None


_TEACHERS: dict[str, tuple] = {}  # teacher spec -> (engine, lock): loaded once per process


def _teacher(spec: dict) -> tuple:
    from stillroom import models
    from stillroom.engines import TorchEngine

    key = json.dumps(spec, sort_keys=True)
    if key not in _TEACHERS:
        if spec.get("backend", "hf") != "hf":
            raise ValueError("a served cascade runs its teacher in process (teacher.backend: hf)")
        if spec.get("weights_sha256"):  # a corrected teacher lives in its run folder: it must still be the one evaluated
            from stillroom.rundir import sha256_file

            weights = Path(spec["model"]) / "model.safetensors"
            if not weights.exists() or sha256_file(weights) != spec["weights_sha256"]:
                raise ValueError(f"the cascade's teacher {weights} is missing or is not the one the version was evaluated with")
        model, tokenizer = models.load(spec["model"], spec.get("dtype", "float32"))
        _TEACHERS[key] = (TorchEngine(model, tokenizer), threading.Lock())
    return _TEACHERS[key]


def load_slot(version: dict, cascade: bool = True, engine: str = "torch", gguf_format: str = "q8_0") -> Slot:
    """A registry version ready to serve: its student on ``engine`` (torch: quantized when the version
    says so; llamacpp: its exported GGUF in ``gguf_format``) and, when it was registered with a fitted
    cascade and ``cascade`` is on, the teacher with the task's context."""
    from stillroom import engines
    from stillroom.plugins import registry
    from stillroom.registry import gguf_file, verify

    verify(version)  # the files are the ones hashed at register: a swapped weights file is refused, not served
    serving = version.get("serving") or {}
    gguf = gguf_file(version, gguf_format) if engine == "llamacpp" else None
    student = engines.load(engine, version["model_path"], serving.get("quantize", "none"), serving.get("smoothing"), gguf)
    slot = Slot(version["name"], student, time.time())
    task = registry().get("task", serving["task"]) if serving.get("task") else None
    if task is not None and hasattr(task, "served_messages"):  # requests are prompted as the run's task prompted the student
        options = serving.get("task_options") or {}
        slot.render = lambda conversation, tools: task.served_messages(conversation, tools, options)
    if cascade and serving.get("cascade"):
        slot.cascade, slot.teacher = serving["cascade"], _teacher(serving["teacher"])
        with_context = serving["teacher"].get("context", "few_shot") != "none"  # a corrected teacher answers the student's own prompt
        slot.to_teacher = registry().get("task", serving["task"]).with_teacher_context if with_context else list
    return slot


def context_problem(engine, messages: list[dict], max_tokens: int) -> str | None:
    """Why ``messages`` plus ``max_tokens`` new tokens do not fit the engine's context, or None when they do."""
    from stillroom import generation

    context, tokenizer = engine.context_length, engine.tokenizer
    prompt = len(tokenizer(generation.render(tokenizer, messages), add_special_tokens=False)["input_ids"])
    if context is not None and prompt + max_tokens > context:
        return (f"the prompt is {prompt} tokens; with max_tokens {max_tokens} that is over the model's context of {context} "
                f"tokens: shorten the messages or lower max_tokens")  # fmt: skip
    return None


def answer(slot: Slot, messages: list[dict], max_tokens: int, temperature: float = 0.0, seed: int | None = None,
           top_p: float = 1.0, constraint: dict | None = None) -> Answer:  # fmt: skip
    """The serving path: the student answers; in a cascade the teacher answers instead when the
    student's confidence is under the threshold or (verifier on) its output is not well formed, and
    the teacher's prompt (with its context) fits the teacher's context. ``constraint`` (``constrained``)
    holds whichever model answers to the same format, on either engine."""
    from stillroom import toolcalls
    from stillroom.routing import confidence, logprob_stats
    from stillroom.teachers import Sampling

    def run(engine, lock, msgs, top_k):
        sample = temperature > 0
        sampling = Sampling(max_tokens, sample, temperature if sample else 1.0, top_p)
        with lock:
            return engine.complete([msgs], sampling, [seed if seed is not None else uuid.uuid4().int % 2**63], top_k,
                                   constraints=[constraint] if constraint else None)[0]  # fmt: skip

    g = run(slot.engine, slot.lock, messages, 1 if slot.cascade else 0)
    if slot.cascade is None:
        return Answer(g.text, g.finished, g.prompt_tokens, len(g.token_ids), "student", None)
    conf = confidence(logprob_stats(g.token_logprobs), slot.cascade["signal"])
    malformed = slot.cascade["verifier"] and bool(toolcalls.parse(g.text).errors)
    if conf >= slot.cascade["threshold"] and not malformed:
        return Answer(g.text, g.finished, g.prompt_tokens, len(g.token_ids), "student", conf)
    t_engine, t_lock = slot.teacher
    with_context = slot.to_teacher(messages)
    if context_problem(t_engine, with_context, max_tokens):  # the teacher cannot take it: the student's answer stands
        return Answer(g.text, g.finished, g.prompt_tokens, len(g.token_ids), "student", conf)
    tg = run(t_engine, t_lock, with_context, 0)
    return Answer(tg.text, tg.finished, tg.prompt_tokens, len(tg.token_ids), "teacher", conf)


class Metrics:
    """Counters and a latency histogram, rendered in the Prometheus text format."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum, self.latency_count, self.escalations = 0.0, 0, 0

    def observe(self, path: str, version: str, status: int, seconds: float | None, escalated: bool = False) -> None:
        """Every response (``path`` one of PATHS or "other"); ``seconds`` only for answered completions."""
        with self.lock:
            key = (path, version, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.escalations += escalated
            if seconds is not None:
                self.buckets[next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))] += 1
                self.latency_sum += seconds
                self.latency_count += 1

    def render(self, current: str | None, swaps: int) -> str:
        with self.lock:
            lines = ["# TYPE stillroom_requests_total counter"]
            lines += [f'stillroom_requests_total{{path="{p}",version="{v}",status="{s}"}} {n}' for (p, v, s), n in sorted(self.requests.items())]
            lines.append("# TYPE stillroom_request_seconds histogram")
            cumulative = 0
            for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], self.buckets):
                cumulative += n
                lines.append(f'stillroom_request_seconds_bucket{{le="{bound}"}} {cumulative}')
            lines += [f"stillroom_request_seconds_sum {self.latency_sum:.6f}", f"stillroom_request_seconds_count {self.latency_count}",
                      "# TYPE stillroom_swaps_total counter", f"stillroom_swaps_total {swaps}",
                      "# TYPE stillroom_escalations_total counter", f"stillroom_escalations_total {self.escalations}",
                      "# TYPE stillroom_escalation_rate gauge",
                      f"stillroom_escalation_rate {self.escalations / max(1, self.latency_count):.6f}",
                      f'stillroom_serving_version{{version="{current}"}} 1']  # fmt: skip
            return "\n".join(lines) + "\n"


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


def _problem(e: dict) -> str:
    """One validation error as ``field: what is wrong``; an unknown field says so and what to do."""
    where = ".".join(str(x) for x in e["loc"][1:]) or "body"
    if e.get("type") == "extra_forbidden":
        return f"{where}: unknown field: this server does not support it, and refuses it rather than ignore it (leave it out)"
    return f"{where}: {e['msg'].removeprefix('Value error, ')}"


def create_app(registry_root: Path, alias: str = "production", poll_s: float = 0.5, cascade: bool = True, engine: str = "torch",
               gguf_format: str = "q8_0") -> FastAPI:  # fmt: skip
    """The app; the first version loads before the app is returned, the watcher starts with it."""
    from stillroom import chat_data, constrained, registry
    from stillroom.chat_wire import reply

    app = FastAPI(title="stillroom serving")
    load = lambda version: load_slot(version, cascade, engine, gguf_format)  # noqa: E731
    state = {"slot": load(registry.resolve(registry_root, alias)), "swaps": [], "error": None}
    state["swaps"].append({"version": state["slot"].version, "at": state["slot"].loaded_at})
    metrics = Metrics()
    stop = threading.Event()

    def watch() -> None:  # load the new version beside the old, then swap the pointer
        while not stop.wait(poll_s):
            try:
                wanted = registry.resolve(registry_root, alias)
                if wanted["name"] != state["slot"].version:
                    slot = load(wanted)
                    state["slot"] = slot  # the swap: one reference assignment
                    state["swaps"].append({"version": slot.version, "at": time.time()})
                state["error"] = None
            except Exception as e:  # keep serving the current version; report the problem on /health
                state["error"] = f"{type(e).__name__}: {e}"

    watcher = threading.Thread(target=watch, daemon=True, name="stillroom-watcher")
    watcher.start()
    app.state.stop = stop

    def observe(path: str, status: int, headers: dict[str, str], seconds: float) -> None:
        answered = path == "/v1/chat/completions" and status == 200
        metrics.observe(path if path in PATHS else "other", headers.get("x-stillroom-version", "-"), status, seconds if answered else None,
                        escalated=headers.get("x-stillroom-served-by") == "teacher")  # fmt: skip

    app.add_middleware(Guard, max_body=MAX_BODY_BYTES, observe=observe)  # body cap, JSON 500s, every response counted

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "the body is not valid JSON", "invalid_json")
        return _error(400, "; ".join(_problem(e) for e in errors), "invalid_request")

    @app.get("/health")
    def health() -> dict:
        slot = state["slot"]
        return {"status": "ok" if state["error"] is None else "degraded", "alias": alias, "version": slot.version,
                "engine": slot.engine.name, "swaps": state["swaps"], "error": state["error"]}  # fmt: skip

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> str:
        return metrics.render(state["slot"].version, len(state["swaps"]) - 1)  # the first entry is the initial load

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [{"id": alias, "object": "model", "owned_by": "stillroom", "version": state["slot"].version}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        slot = state["slot"]  # taken once: a swap during this request does not touch it
        version = {"x-stillroom-version": slot.version}
        if req.model not in (alias, slot.version, "stillroom"):
            return _error(404, f"unknown model {req.model!r}; this server serves {alias!r} (now {slot.version})", "model_not_found", version)
        constraint = req.constraint()
        if constraint is not None and constraint["type"] == "tools" and constraint["choice"] == "none" and not constrained.available():
            constraint = None  # without the grammar engine, calls are dropped from the answer instead of prevented
        problem = constrained.problem(constraint) if constraint is not None else None
        if problem:
            return _error(400, f"{'response_format' if req.response_format else 'tools'}: {problem}", "invalid_request", version)
        tools = req.offered()
        if tools and slot.render is None:
            return _error(400, f"version {slot.version} was registered without its task, so it cannot render tools: register the run again",
                          "invalid_request", version)  # fmt: skip
        conversation = req.conversation()
        messages = slot.render(conversation, tools) if slot.render else chat_data.text_messages(conversation)
        too_long = context_problem(slot.engine, messages, req.new_tokens)
        if too_long:
            return _error(400, too_long, "context_length_exceeded", version)
        a = answer(slot, messages, req.new_tokens, req.temperature, req.seed, req.top_p, constraint)
        message, finish = reply(a.text, a.finished, bool(tools), req.choice)
        body = {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": slot.version,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens, "total_tokens": a.prompt_tokens + a.completion_tokens},
            "stillroom": {"version": slot.version, "served_by": a.served_by, "confidence": a.confidence},
        }  # fmt: skip
        return JSONResponse(body, headers={**version, "x-stillroom-served-by": a.served_by})

    return app


def serve(registry_root: Path, alias: str, host: str, port: int, poll_s: float, cascade: bool = True, engine: str = "torch",
          gguf_format: str = "q8_0") -> None:  # fmt: skip
    import uvicorn

    app = create_app(registry_root, alias, poll_s, cascade, engine, gguf_format)
    print(json.dumps({"serving": alias, "url": f"http://{host}:{port}/v1"}), flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
