"""A stand-in OpenAI-compatible server for the `bench serve` tests: FastAPI on uvicorn in a
thread, streaming SSE chunks with fixed delays, for /v1/completions and /v1/chat/completions.

    with FakeServer(first_delay_s=0.05, chunk_delay_s=0.01) as server:
        server.base_url   # http://127.0.0.1:PORT
        server.log        # one FakeCall per request served, in arrival order

Each request gets `max_tokens` (or `max_completion_tokens`) chunks of one token each; the k-th
request's chunk i is " r{k}t{i}", so every answer is different. With include_usage (and
send_usage), a last chunk carries usage {prompt_tokens: 0, completion_tokens: max_tokens}.
`mode` makes it misbehave: "non_json" answers POSTs with HTTP 200 and plain text,
"no_choices" streams events without `choices`, "bad_models" answers GET /v1/models with text.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


@dataclass
class FakeCall:
    body: dict[str, Any]
    answer: str = ""
    received: float = 0.0  # time.perf_counter()
    finished: float = 0.0


@dataclass
class FakeServer:
    first_delay_s: float = 0.05
    chunk_delay_s: float = 0.01
    mode: str = "ok"
    model_root: str | None = None  # reported as the model card's "root"
    send_usage: bool = True  # honour stream_options.include_usage
    log: list[FakeCall] = field(default_factory=list)

    def __post_init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self._app(), host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> FakeServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> Any:
            if self.mode == "bad_models":
                return PlainTextResponse("hello, not an API")
            card = {"id": "fake-model", "object": "model", "owned_by": "test"}
            if self.model_root:
                card["root"] = self.model_root
            return {"object": "list", "data": [card]}

        @app.post("/v1/completions")
        async def completions(request: Request) -> Any:
            return await self._answer(await request.json(), chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            return await self._answer(await request.json(), chat=True)

        return app

    async def _answer(self, body: dict[str, Any], chat: bool) -> Any:
        if self.mode == "non_json":
            return PlainTextResponse("hello world")
        n = body.get("max_completion_tokens") or body.get("max_tokens")
        if not isinstance(n, int) or not body.get("stream"):
            return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        call = FakeCall(body=body, received=time.perf_counter())
        k = len(self.log)
        self.log.append(call)
        include_usage = self.send_usage and bool(
            (body.get("stream_options") or {}).get("include_usage")
        )
        return StreamingResponse(
            self._stream(call, k, n, chat, include_usage), media_type="text/event-stream"
        )

    async def _stream(self, call: FakeCall, k: int, n: int, chat: bool, include_usage: bool):
        await asyncio.sleep(self.first_delay_s)
        for i in range(n):
            if i:
                await asyncio.sleep(self.chunk_delay_s)
            text = f" r{k}t{i}"
            call.answer += text
            if self.mode == "no_choices":
                chunk: dict[str, Any] = {"id": "x", "text": text}
            elif chat:
                chunk = {
                    "id": f"chat-{k}",
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                }
            else:
                chunk = {
                    "id": f"cmpl-{k}",
                    "object": "text_completion",
                    "choices": [{"index": 0, "text": text, "finish_reason": None}],
                }
            yield f"data: {json.dumps(chunk)}\n\n"
        if include_usage:
            usage = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
            yield f"data: {json.dumps({'id': 'u', 'choices': [], 'usage': usage})}\n\n"
        call.finished = time.perf_counter()
        yield "data: [DONE]\n\n"
