"""The official `openai` client against a real `lmserve serve`: completions and chat, sync and
async, streaming and not. Every response body and every stream chunk is checked against
OpenAI's OpenAPI schemas."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.entrypoints.openai.openapi_schema import validate

PROMPT = "The small engine hums along the valley road"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Count the boats on the water."},
]


def completion(server, **kwargs):
    """(typed response, raw JSON body) of a non-streaming completion, schema-checked."""
    raw = server.client().completions.with_raw_response.create(model=server.model, **kwargs)
    body = raw.http_response.json()
    validate(body, "CreateCompletionResponse", relaxed=bool(kwargs.get("echo")))
    return raw.parse(), body


def chat(server, **kwargs):
    raw = server.client().chat.completions.with_raw_response.create(
        model=server.model, messages=kwargs.pop("messages", MESSAGES), **kwargs
    )
    body = raw.http_response.json()
    validate(body, "CreateChatCompletionResponse")
    return raw.parse(), body


def stream_completion(server, **kwargs) -> list[dict]:
    chunks = []
    for chunk in server.client().completions.create(model=server.model, stream=True, **kwargs):
        data = chunk.to_dict()  # exactly the fields the server sent
        validate(data, "CreateCompletionResponse", relaxed=True)
        chunks.append(data)
    return chunks


def stream_chat(server, **kwargs) -> list[dict]:
    chunks = []
    stream = server.client().chat.completions.create(
        model=server.model, messages=kwargs.pop("messages", MESSAGES), stream=True, **kwargs
    )
    for chunk in stream:
        data = chunk.to_dict()
        validate(data, "CreateChatCompletionStreamResponse")
        chunks.append(data)
    return chunks


def joined_text(chunks: list[dict], index: int = 0, key: str = "text") -> str:
    parts = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["index"] == index:
                parts.append(choice[key] if key == "text" else choice["delta"].get("content") or "")
    return "".join(parts)


# ---- models, health, tokenizer ---------------------------------------------------------------
def test_models_list_and_retrieve(server):
    body = server.get("/v1/models").json()
    validate(body, "ListModelsResponse")
    assert [m["id"] for m in body["data"]] == [server.model]
    model = server.client().models.retrieve(server.model)
    validate(model.to_dict(), "Model")
    assert model.id == server.model


def test_health_version_metrics(server):
    assert server.get("/health").status_code == 200
    assert server.get("/version").json()["version"]
    metrics = server.get("/metrics")
    assert metrics.status_code == 200
    assert "text/plain" in metrics.headers["content-type"]
    assert "lmserve:num_requests_running" in metrics.text


def test_tokenize_detokenize_roundtrip(server):
    tokens = server.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 3
    assert tokens["max_model_len"] == 512
    text = server.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert PROMPT in text
    chat_tokens = server.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat_tokens["count"] > tokens["count"]


# ---- completions ---------------------------------------------------------------------------
def test_completion_greedy_length_and_usage(server):
    resp, body = completion(
        server, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert body["usage"]["completion_tokens"] == 6
    num_prompt = server.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    assert body["usage"]["prompt_tokens"] == num_prompt
    assert body["usage"]["total_tokens"] == num_prompt + 6
    assert body["id"].startswith("cmpl-") and body["model"] == server.model


def test_completion_stream_matches_non_stream(server):
    kwargs = dict(prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    resp, _ = completion(server, **kwargs)
    chunks = stream_completion(server, stream_options={"include_usage": True}, **kwargs)
    assert joined_text(chunks) == resp.choices[0].text
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 8
    assert all("usage" not in c for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1


def test_completion_n_and_prompt_list(server):
    prompts = [PROMPT, "A farmer walks"]
    resp, body = completion(
        server, prompt=prompts, n=2, max_tokens=4, temperature=1.0, seed=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sorted(c.index for c in resp.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in resp.choices)
    num_prompt = sum(server.post("/tokenize", json={"prompt": p}).json()["count"] for p in prompts)
    assert body["usage"]["prompt_tokens"] == num_prompt
    assert body["usage"]["completion_tokens"] == 4 * 4
    chunks = stream_completion(server, prompt=prompts, n=2, max_tokens=4, temperature=0)
    assert {ch["index"] for c in chunks for ch in c["choices"]} == {0, 1, 2, 3}


def test_token_id_prompts_match_text(server):
    ids = server.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    kwargs = dict(max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    from_text, _ = completion(server, prompt=PROMPT, **kwargs)
    from_ids, _ = completion(server, prompt=ids, **kwargs)
    from_id_lists, _ = completion(server, prompt=[ids, ids[:-1]], **kwargs)
    assert from_ids.choices[0].text == from_text.choices[0].text
    assert from_id_lists.choices[0].text == from_text.choices[0].text
    assert len(from_id_lists.choices) == 2


def test_completion_logprobs(server):
    resp, body = completion(
        server, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    if "\ufffd" not in "".join(lp["tokens"]):  # byte-level pieces of one character differ
        assert "".join(lp["tokens"]) == body["choices"][0]["text"]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert logprob <= 0
        # top-3 plus the sampled token, keyed by text: tokens that decode alike share a key
        assert 1 <= len(top) <= 4
        assert top[token] == pytest.approx(max(top.values()))  # greedy: the top token
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0


def test_completion_echo_with_logprobs(server):
    num_prompt = server.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    resp, body = completion(
        server, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = body["choices"][0]
    assert choice["text"].startswith(PROMPT) and len(choice["text"]) > len(PROMPT)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == num_prompt + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x is not None for x in lp["token_logprobs"][1:])
    # streamed echo: the prompt comes first
    chunks = stream_completion(server, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    assert joined_text(chunks) == choice["text"]


def test_completion_stop_string(server):
    free, _ = completion(
        server, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"no usable stop string in {text!r}"
    kwargs = dict(prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    stopped, body = completion(server, **kwargs, extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert body["choices"][0]["stop_reason"] == stop
    kept, _ = completion(
        server, **kwargs, extra_body={"ignore_eos": True, "include_stop_str_in_output": True}
    )
    assert kept.choices[0].text == text[: text.index(stop) + len(stop)]
    streamed = stream_completion(server, **kwargs, extra_body={"ignore_eos": True})
    assert joined_text(streamed) == stopped.choices[0].text


def test_seed_reproducibility(server):
    kwargs = dict(prompt=PROMPT, max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    a, _ = completion(server, seed=1234, **kwargs)
    b, _ = completion(server, seed=1234, **kwargs)
    c, _ = completion(server, seed=4321, **kwargs)
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text != c.choices[0].text


def test_logit_bias_forces_a_token(server):
    target = server.post("/tokenize", json={"prompt": " boats", "add_special_tokens": False})
    token_id = target.json()["tokens"][0]
    resp, body = completion(
        server, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=0,
        logit_bias={str(token_id): 100}, logprobs=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    ids = server.post(
        "/tokenize", json={"prompt": resp.choices[0].text, "add_special_tokens": False}
    ).json()["tokens"]
    assert set(ids) == {token_id}


def test_sampling_extras_accepted(server):
    resp, body = completion(
        server, prompt=PROMPT, max_tokens=6, temperature=0.8, top_p=0.9, seed=7,
        presence_penalty=0.5, frequency_penalty=0.5, user="someone", best_of=1,
        extra_body={
            "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 6,
            "stop_token_ids": [2], "skip_special_tokens": True, "priority": 0,
        },
    )  # fmt: skip
    assert body["usage"]["completion_tokens"] == 6  # min_tokens == max_tokens


# ---- chat ----------------------------------------------------------------------------------
def test_chat_non_stream(server):
    resp, body = chat(server, max_completion_tokens=6, temperature=0)
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["usage"]["completion_tokens"] <= 6
    num_prompt = server.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    assert body["usage"]["prompt_tokens"] == num_prompt


def test_chat_stream_matches_non_stream_with_usage(server):
    kwargs = dict(max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    resp, _ = chat(server, **kwargs)
    chunks = stream_chat(server, stream_options={"include_usage": True}, **kwargs)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert joined_text(chunks, key="content") == resp.choices[0].message.content
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])
    finish = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finish == ["length"]


def test_chat_n_with_logprobs(server):
    resp, body = chat(
        server, n=2, max_tokens=5, temperature=1.0, seed=11, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert sorted(c["index"] for c in body["choices"]) == [0, 1]
    for choice in body["choices"]:
        content = choice["logprobs"]["content"]
        assert len(content) == 5
        for entry in content:
            assert len(entry["top_logprobs"]) == 3
            assert entry["bytes"] == list(entry["token"].encode())
            ranked = [t["logprob"] for t in entry["top_logprobs"]]
            assert ranked == sorted(ranked, reverse=True)
            assert entry["logprob"] <= ranked[0] + 1e-6


def test_chat_stream_n_with_logprobs(server):
    chunks = stream_chat(
        server, n=2, max_tokens=5, temperature=1.0, seed=5, logprobs=True, top_logprobs=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for index in (0, 1):
        entries = [
            e
            for c in chunks
            for ch in c["choices"]
            if ch["index"] == index and ch.get("logprobs")
            for e in ch["logprobs"]["content"]
        ]
        assert len(entries) == 5
        finishes = [
            ch["finish_reason"] for c in chunks for ch in c["choices"]
            if ch["index"] == index and ch["finish_reason"]
        ]  # fmt: skip
        assert finishes == ["length"]


def test_raw_sse_stream_is_schema_valid(server):
    """Without the client: every `data:` line is JSON (schema-valid) until `[DONE]`."""
    payload = {
        "model": server.model, "messages": MESSAGES, "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 1,
    }  # fmt: skip
    with server.stream("POST", "/v1/chat/completions", json=payload) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        assert line.startswith("data: ")
        validate(json.loads(line[len("data: ") :]), "CreateChatCompletionStreamResponse")


# ---- async client --------------------------------------------------------------------------
def test_async_client_concurrent_requests(server):
    sync_resp, _ = chat(server, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    expected = sync_resp.choices[0].message.content

    async def one_chat(client) -> str:
        resp = await client.chat.completions.create(
            model=server.model, messages=MESSAGES, max_tokens=6, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        validate(resp.to_dict(), "CreateChatCompletionResponse")
        return resp.choices[0].message.content

    async def one_stream(client) -> str:
        stream = await client.chat.completions.create(
            model=server.model, messages=MESSAGES, max_tokens=6, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        parts = []
        async for chunk in stream:
            validate(chunk.to_dict(), "CreateChatCompletionStreamResponse")
            parts += [c.delta.content or "" for c in chunk.choices]
        return "".join(parts)

    async def one_completion(client) -> str:
        resp = await client.completions.create(
            model=server.model, prompt=PROMPT, max_tokens=3, temperature=0
        )
        validate(resp.to_dict(), "CreateCompletionResponse")
        return resp.choices[0].text

    async def main() -> list[str]:
        async with server.async_client() as client:
            jobs = [one_chat(client), one_stream(client)] * 3 + [one_completion(client)] * 2
            return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert results[:6] == [expected] * 6
