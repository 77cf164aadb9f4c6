"""An OpenAI-compatible ``/v1/chat/completions`` endpoint over a local model, through stillroom's own
generation path (FastAPI). It returns ``logprobs`` / ``top_logprobs`` and honours vLLM's
``return_tokens_as_token_ids``, so the ``openai`` teacher backend can read full signal from it.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from stillroom.http_guard import Guard, no_stream

MAX_TOP_LOGPROBS = 128
MAX_BODY_BYTES = 4 << 20  # a long multi-step conversation fits; an upload past it is refused while it streams in


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]  # tool: a tool result sent back in a multi-step conversation
    content: str = Field(max_length=100_000)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # clients send fields we do not use (stream options, ...)
    model: str = Field(max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=1)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    return_tokens_as_token_ids: bool = False
    stream: Annotated[bool, AfterValidator(no_stream)] = False


def create_app(model, tokenizer, model_name: str) -> FastAPI:
    from stillroom import generation
    from stillroom.engines import TorchEngine
    from stillroom.serve import context_problem

    app = FastAPI(title="stillroom teacher endpoint")
    app.add_middleware(Guard, max_body=MAX_BODY_BYTES, observe=lambda *_: None)  # body cap and JSON 500s
    lock = threading.Lock()  # one model, one forward at a time
    engine = TorchEngine(model, tokenizer)  # for context_problem

    def token_name(token_id: int, as_ids: bool) -> str:
        return f"token_id:{token_id}" if as_ids else tokenizer.convert_ids_to_tokens(token_id)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict:
        if req.model != model_name:
            raise HTTPException(404, f"unknown model {req.model!r}; this server serves {model_name!r}")
        messages = [m.model_dump() for m in req.messages]
        too_long = context_problem(engine, messages, req.max_tokens)
        if too_long:
            raise HTTPException(400, too_long)
        prompt = generation.render(tokenizer, messages)
        sample = req.temperature > 0
        k = req.top_logprobs if req.logprobs else 0
        with lock:
            g = generation.generate(
                model, tokenizer, [prompt], max_new_tokens=req.max_tokens, sample=sample,
                temperature=req.temperature if sample else 1.0, top_p=req.top_p,
                seeds=[req.seed if req.seed is not None else uuid.uuid4().int % 2**63], top_k=max(k, 1) if req.logprobs else 0,
            )[0]  # fmt: skip
        logprobs = None
        if req.logprobs:
            n = len(g.token_ids)  # emitted tokens only, as chat APIs report them
            logprobs = {"content": [
                {"token": token_name(t, req.return_tokens_as_token_ids), "logprob": g.token_logprobs[i], "bytes": None,
                 "top_logprobs": [{"token": token_name(a, req.return_tokens_as_token_ids), "logprob": b}
                                  for a, b in zip(g.topk_ids[i][:k], g.topk_logprobs[i][:k])]}
                for i, t in enumerate(g.token_ids[:n])
            ]}  # fmt: skip
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": g.text},
                "finish_reason": "stop" if g.finished else "length", "logprobs": logprobs,
            }],  # fmt: skip
            "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.token_ids),
                      "total_tokens": g.prompt_tokens + len(g.token_ids)},  # fmt: skip
        }

    return app
