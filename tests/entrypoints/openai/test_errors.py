"""Malformed requests: each gets a 4xx with OpenAI's error body (schema-checked), never a 500
or a dropped connection, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.entrypoints.openai.conftest import MAX_MODEL_LEN
from tests.entrypoints.openai.openapi_schema import validate

LONG_TEXT = "the road is long and the night is cold " * 120  # well over 512 tokens
MSG = [{"role": "user", "content": "hi"}]


def cmpl(**fields) -> dict:
    return {"model": "tiny-llama", "prompt": "hello", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"model": "tiny-llama", "messages": MSG, "max_tokens": 2, **fields}


# (id, path, JSON body or raw bytes, expected status, expected `param` or None to skip)
CASES = [
    ("bad-json", "/v1/completions", b'{"prompt": "x"', 400, None),
    ("body-not-object", "/v1/completions", b"[1, 2]", 400, None),
    ("empty-body", "/v1/chat/completions", b"", 400, None),
    ("not-utf8", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None),
    ("nan", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, None),
    ("huge-float", "/v1/completions", b'{"prompt": "x", "temperature": 1e999}', 400, None),
    ("deep-nesting", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("prompt-missing", "/v1/completions", {"model": "tiny-llama"}, 400, "prompt"),
    ("prompt-int", "/v1/completions", cmpl(prompt=5), 400, "prompt"),
    ("prompt-empty-list", "/v1/completions", cmpl(prompt=[]), 400, "prompt"),
    ("prompt-mixed", "/v1/completions", cmpl(prompt=["a", 1]), 400, "prompt"),
    ("prompt-empty-ids", "/v1/completions", cmpl(prompt=[[1, 2], []]), 400, "prompt"),
    ("negative-token-id", "/v1/completions", cmpl(prompt=[1, -5, 7]), 400, "prompt"),
    ("oov-token-id", "/v1/completions", cmpl(prompt=[1, 99999]), 400, "prompt"),
    ("prompt-too-long", "/v1/completions", cmpl(prompt=LONG_TEXT), 400, "prompt"),
    ("max-tokens-string", "/v1/completions", cmpl(max_tokens="10"), 400, "max_tokens"),
    ("max-tokens-zero", "/v1/completions", cmpl(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", "/v1/completions", cmpl(max_tokens=-3), 400, "max_tokens"),
    ("max-tokens-too-big", "/v1/completions", cmpl(max_tokens=10_000), 400, "max_tokens"),
    ("max-tokens-huge-int", "/v1/completions", cmpl(max_tokens=2**80), 400, "max_tokens"),
    ("temperature-negative", "/v1/completions", cmpl(temperature=-1), 400, "temperature"),
    ("temperature-string", "/v1/completions", cmpl(temperature="hot"), 400, "temperature"),
    ("top-p-zero", "/v1/completions", cmpl(top_p=0), 400, "top_p"),
    ("top-p-big", "/v1/completions", cmpl(top_p=1.5), 400, "top_p"),
    ("top-k-negative", "/v1/completions", cmpl(top_k=-5), 400, "top_k"),
    ("min-p-big", "/v1/completions", cmpl(min_p=2), 400, "min_p"),
    ("n-zero", "/v1/completions", cmpl(n=0), 400, "n"),
    ("n-huge", "/v1/completions", cmpl(n=100_000), 400, "n"),
    ("n-bool", "/v1/completions", cmpl(n=True), 400, "n"),
    ("logprobs-21", "/v1/completions", cmpl(logprobs=21), 400, "logprobs"),
    ("presence-penalty", "/v1/completions", cmpl(presence_penalty=3), 400, "presence_penalty"),
    ("frequency-penalty", "/v1/completions", cmpl(frequency_penalty=-3), 400, "frequency_penalty"),
    (
        "repetition-penalty",
        "/v1/completions",
        cmpl(repetition_penalty=0),
        400,
        "repetition_penalty",
    ),
    ("logit-bias-key", "/v1/completions", cmpl(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit-bias-value", "/v1/completions", cmpl(logit_bias={"5": 500}), 400, "logit_bias"),
    ("logit-bias-oov", "/v1/completions", cmpl(logit_bias={"99999": 1}), 400, "logit_bias"),
    ("logit-bias-type", "/v1/completions", cmpl(logit_bias=[1, 2]), 400, "logit_bias"),
    ("stop-int", "/v1/completions", cmpl(stop=5), 400, "stop"),
    ("stop-empty-string", "/v1/completions", cmpl(stop=[""]), 400, "stop"),
    ("stop-token-ids-oov", "/v1/completions", cmpl(stop_token_ids=[99999]), 400, "stop_token_ids"),
    ("min-tokens-over-max", "/v1/completions", cmpl(min_tokens=5, max_tokens=2), 400, "min_tokens"),
    ("seed-string", "/v1/completions", cmpl(seed="7"), 400, "seed"),
    ("seed-too-big", "/v1/completions", cmpl(seed=2**70), 400, "seed"),
    ("ignore-eos-string", "/v1/completions", cmpl(ignore_eos="yes"), 400, "ignore_eos"),
    ("priority-string", "/v1/completions", cmpl(priority="high"), 400, "priority"),
    (
        "stream-options-no-stream",
        "/v1/completions",
        cmpl(stream_options={"include_usage": True}),
        400,
        "stream_options",
    ),
    ("suffix", "/v1/completions", cmpl(suffix="tail"), 400, "suffix"),
    ("best-of", "/v1/completions", cmpl(best_of=3), 400, "best_of"),
    ("unknown-model", "/v1/completions", cmpl(model="gpt-17"), 404, "model"),
    ("chat-messages-missing", "/v1/chat/completions", {"model": "tiny-llama"}, 400, "messages"),
    ("chat-messages-empty", "/v1/chat/completions", chat(messages=[]), 400, "messages"),
    ("chat-message-not-object", "/v1/chat/completions", chat(messages=["hi"]), 400, "messages[0]"),
    (
        "chat-unknown-role",
        "/v1/chat/completions",
        chat(messages=[{"role": "wizard", "content": "hi"}]),
        400,
        "messages",
    ),
    (
        "chat-content-int",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": 5}]),
        400,
        "messages",
    ),
    (
        "chat-image-part",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "messages",
    ),
    (
        "chat-too-long",
        "/v1/chat/completions",
        chat(messages=[{"role": "user", "content": LONG_TEXT}]),
        400,
        "messages",
    ),
    (
        "chat-max-completion-tokens",
        "/v1/chat/completions",
        chat(max_completion_tokens=10_000),
        400,
        "max_completion_tokens",
    ),
    ("chat-top-logprobs-alone", "/v1/chat/completions", chat(top_logprobs=2), 400, "top_logprobs"),
    (
        "chat-top-logprobs-30",
        "/v1/chat/completions",
        chat(logprobs=True, top_logprobs=30),
        400,
        "top_logprobs",
    ),
    ("chat-logprobs-int", "/v1/chat/completions", chat(logprobs=3), 400, "logprobs"),
    (
        "chat-tool-bad-parameters",
        "/v1/chat/completions",
        chat(
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
            tool_choice="required",
        ),
        400,
        "tools",
    ),
    (
        "chat-tools-auto-without-parser",
        "/v1/chat/completions",
        chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "tool_choice",
    ),
    (
        "chat-response-format-unknown",
        "/v1/chat/completions",
        chat(response_format={"type": "xml"}),
        400,
        "response_format",
    ),
    ("chat-n-zero", "/v1/chat/completions", chat(n=0), 400, "n"),
    ("chat-unknown-model", "/v1/chat/completions", chat(model="nope"), 404, "model"),
    ("detokenize-oov", "/detokenize", {"tokens": [1, 99999]}, 400, "tokens"),
    ("tokenize-both", "/tokenize", {"prompt": "a", "messages": MSG}, 400, None),
]


def send(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    if isinstance(body, bytes):
        headers = {"Content-Type": "application/json", **(headers or {})}
        return server.post(path, content=body, headers=headers)
    return server.post(path, json=body, headers=headers or {})


def check_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    validate(body, "ErrorResponse")
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize(
    "path, body, status, param", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_malformed_request_gets_openai_error(server, path, body, status, param):
    check_error(send(server, path, body), status, param)
    assert server.get("/health").status_code == 200


def test_context_length_errors_state_both_numbers(server):
    error = check_error(send(server, "/v1/completions", cmpl(prompt=LONG_TEXT)), 400, "prompt")
    num_tokens = server.post("/tokenize", json={"prompt": LONG_TEXT}).json()["count"]
    assert str(MAX_MODEL_LEN) in error["message"] and str(num_tokens) in error["message"]
    assert error["code"] == "context_length_exceeded"
    error = check_error(send(server, "/v1/completions", cmpl(max_tokens=10_000)), 400, "max_tokens")
    assert str(MAX_MODEL_LEN) in error["message"] and "10000" in error["message"]


def test_engine_value_errors_name_the_field(server):
    error = check_error(send(server, "/v1/completions", cmpl(temperature=-1)), 400, "temperature")
    assert "temperature" in error["message"] and "-1" in error["message"]
    error = check_error(send(server, "/v1/completions", cmpl(prompt=[1, 99999])), 400, "prompt")
    assert "99999" in error["message"]


def test_api_key_required_on_v1_routes(server):
    for path, body in [("/v1/completions", cmpl()), ("/v1/chat/completions", chat())]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test"}):
            response = httpx.post(server.url + path, json=body, headers=headers)
            error = check_error(response, 401)
            assert error["code"] == "invalid_api_key"
    check_error(httpx.get(server.url + "/v1/models"), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # not a /v1 route


def test_oversized_body_is_413(server):
    big = json.dumps(cmpl(prompt="x" * (2 * 1024 * 1024))).encode()
    check_error(send(server, "/v1/completions", big), 413)

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b" " * 64 * 1024

    response = server.post("/v1/completions", content=chunks())
    check_error(response, 413)


def test_unknown_route_and_method(server):
    check_error(server.get("/v1/nothing-here"), 404)
    check_error(server.get("/v1/completions"), 405)
    check_error(server.get("/v1/models/not-a-model"), 404, "model")


def test_server_still_serves_afterwards(server):
    response = send(server, "/v1/completions", cmpl(max_tokens=3))
    assert response.status_code == 200
    validate(response.json(), "CreateCompletionResponse")
    response = send(server, "/v1/chat/completions", chat(max_tokens=3))
    assert response.status_code == 200
    validate(response.json(), "CreateChatCompletionResponse")
