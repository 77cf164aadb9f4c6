"""The outermost layer of stillroom's HTTP servers (plain ASGI, under FastAPI's own error handling):

- the request body is read as it streams in and refused with 413 as soon as it passes the cap, before
  the rest is read (a ``content-length`` over the cap is refused before any of it is read);
- an error no handler caught becomes a JSON 500 with a message, not a plain-text one and a reset
  connection; its traceback goes to the server's log;
- every response, whatever its status, is reported to ``observe`` (the server's /metrics).

``no_stream`` is the request field both servers share: ``stream: true`` is refused with a message.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable

Observe = Callable[[str, int, dict[str, str], float], None]  # (path, status, response headers, seconds)


def no_stream(stream: bool) -> bool:
    """A request's ``stream`` field: these servers answer whole responses only, and say so."""
    if stream:
        raise ValueError("streaming is not supported by this server; send stream: false (or leave it out)")
    return stream


async def _respond(send, status: int, message: str, kind: str) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, max_body: int, observe: Observe):
        self.app, self.max_body, self.observe = app, max_body, observe

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, seen = time.perf_counter(), {"status": None, "headers": {}, "failed": False}

        async def send_seen(message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                seen["headers"] = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])}
            await send(message)

        try:
            body_receive = await self._bounded_body(scope, receive, send_seen)
            if body_receive is not None:
                await self.app(scope, body_receive, send_seen)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            seen["failed"] = True
            if seen["status"] is None:
                await _respond(send_seen, 500, "internal error while answering this request (the server log has the details)", "server_error")
        finally:
            status = seen["status"] or (500 if seen["failed"] else 499)  # 499: the client left before an answer
            self.observe(scope["path"], status, seen["headers"], time.perf_counter() - started)

    async def _bounded_body(self, scope, receive, send) -> Callable[[], Awaitable[dict]] | None:
        """A ``receive`` that replays the body read here, or None when a 413 was sent instead."""
        too_large = f"request body over {self.max_body} bytes"
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _respond(send, 413, too_large, "request_too_large")
            return None
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body:  # stop reading: the rest of the upload is never buffered
                await _respond(send, 413, too_large, "request_too_large")
                return None
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return replay
