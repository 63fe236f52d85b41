"""Stand-ins for router tests: a scriptable OpenAI-compatible engine and a thread that serves
any ASGI app (the router itself, the stand-ins) with uvicorn on a free port.

    with StandInEngine("a") as a, serve_in_thread(build_app(config)) as router: ...

A StandInEngine answers /v1/completions and /v1/chat/completions with `num_chunks` SSE chunks
(when "stream" is set) or one JSON body whose text names the engine, so a test sees where each
request went. Its attributes change its behaviour while it runs:
    healthy       False: /health answers 503
    fail          "drop": break the connection after the headers, before any chunk;
                  "midstream": break it after the first chunk; "status": answer `fail_status`
    running, waiting   the queue lengths its /metrics reports
    chunk_delay_s      pause between chunks
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tests.ports import free_port


class BrokenStream(Exception):
    """Raised inside a streaming body: uvicorn drops the connection mid-response."""


@dataclass
class ServedApp:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    state: Any = None  # a router's RouterState, for tests that look inside

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_in_thread(app: Any, port: int | None = None, host: str = "127.0.0.1") -> ServedApp:
    """Serve `app` with uvicorn (lifespan on) in a daemon thread; returns once it listens."""
    port = port or free_port()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    return ServedApp(f"http://{host}:{port}", server, thread)


@contextlib.contextmanager
def serve_in_thread(app: Any, port: int | None = None) -> Iterator[ServedApp]:
    served = start_in_thread(app, port)
    try:
        yield served
    finally:
        served.stop()


@dataclass
class StandInEngine:
    name: str
    models: tuple[str, ...] = ("m",)
    healthy: bool = True
    fail: str | None = None
    fail_status: int = 400
    running: float = 0.0
    waiting: float = 0.0
    num_chunks: int = 3
    chunk_delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)  # body + "headers"
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"  # any 127.x.y.z: Kubernetes tests give each "pod" its own address

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> StandInEngine:
        self._served = start_in_thread(self.app(), self.port, self.host)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._served.stop()

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200 if self.healthy else 503)

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(
                f'lmserve:num_requests_running{{model_name="m"}} {self.running}\n'
                f'lmserve:num_requests_waiting{{model_name="m"}} {self.waiting}\n'
            )

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}

        @app.post("/v1/completions")
        @app.post("/v1/chat/completions")
        async def generate(request: Request) -> Response:
            body = await request.json()
            self.requests.append({**body, "headers": dict(request.headers)})
            if self.fail == "status":
                error = {"error": {"message": f"{self.name} refuses", "type": "x", "code": 7}}
                return JSONResponse(error, status_code=self.fail_status)
            if body.get("stream"):
                return StreamingResponse(self._chunks(), media_type="text/event-stream")
            return JSONResponse(self._completion(self.name))

        return app

    def _completion(self, text: str) -> dict[str, Any]:
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 0,
            "model": self.models[0],
            "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
        }

    async def _chunks(self):
        if self.fail == "drop":
            raise BrokenStream("dropped before the first chunk")
        for i in range(self.num_chunks):
            if i:
                await asyncio.sleep(self.chunk_delay_s)
            yield f"data: {json.dumps(self._completion(f'{self.name}{i} '))}\n\n"
            if self.fail == "midstream":
                raise BrokenStream("dropped mid-stream")
        yield "data: [DONE]\n\n"
