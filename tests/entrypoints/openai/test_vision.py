"""Images through the OpenAI server with the official client: chat with `image_url` parts
(data: URLs and http URLs fetched from a local server listed in --allowed-media-domains),
non-streamed and streamed; every bad input is a 400 with OpenAI's error body and the server
keeps serving."""

from __future__ import annotations

import base64
import http.server
import io
import threading
import time

import openai
import pytest

from tests.entrypoints.openai.conftest import start_server
from tests.tiny_vlm import TOKENS_PER_IMAGE, make_image, make_tiny_llava

MAX_MEDIA_BYTES = 64 * 1024
FETCH_TIMEOUT_S = 1.0


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    make_image(seed).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/slow.png":
            time.sleep(FETCH_TIMEOUT_S * 3)
            body = png_bytes(0)
        elif self.path == "/big.png":
            body = b"\x89PNG" + b"\x00" * (MAX_MEDIA_BYTES * 2)
        elif self.path == "/cat.png":
            body = png_bytes(0)
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory):
    model_dir = make_tiny_llava(tmp_path_factory.mktemp("llava-server"), "clip", "llama")
    env = {
        "LMSERVE_MEDIA_FETCH_TIMEOUT_S": str(FETCH_TIMEOUT_S),
        "LMSERVE_MAX_MEDIA_BYTES": str(MAX_MEDIA_BYTES),
    }
    server = start_server(
        model_dir,
        "--allowed-media-domains", "127.0.0.1",
        "--limit-mm-per-prompt", '{"image": 2}',
        "--max-num-batched-tokens", "8",
        log_dir=tmp_path_factory.mktemp("vision-server"),
        env=env,
    )  # fmt: skip
    yield server
    server.stop()


def image_message(*urls: str, text: str = "What is in the picture?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def chat(server, messages, **kwargs):
    return server.client().chat.completions.create(
        model=server.model, messages=messages, max_tokens=6, temperature=0, **kwargs
    )


def test_image_chat_non_streamed_and_streamed_agree(vision_server):
    messages = image_message(data_url(png_bytes(0)))
    reply = chat(vision_server, messages)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 6
    assert reply.usage.prompt_tokens > TOKENS_PER_IMAGE  # placeholders expanded
    chunks = list(chat(vision_server, messages, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content
    again = chat(vision_server, messages)  # the same image: its KV comes from the prefix cache
    assert again.choices[0].message.content == reply.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0


def test_image_from_an_allowed_http_url_matches_the_data_url(vision_server, image_host):
    by_url = chat(vision_server, image_message(f"{image_host}/cat.png"))
    by_data = chat(vision_server, image_message(data_url(png_bytes(0))))
    assert by_url.choices[0].message.content == by_data.choices[0].message.content


def test_two_images_in_one_message(vision_server):
    reply = chat(vision_server, image_message(data_url(png_bytes(0)), data_url(png_bytes(1))))
    assert reply.usage.prompt_tokens > 2 * TOKENS_PER_IMAGE


BAD_INPUTS = {
    "corrupt image": lambda host: image_message(data_url(b"\x89PNG\r\n\x1a\n garbage")),
    "unsupported format": lambda host: image_message(
        data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")
    ),
    "not an image media type": lambda host: image_message(data_url(b"hello", "text/plain")),
    "bad base64": lambda host: image_message("data:image/png;base64,@@@"),
    "too many images": lambda host: image_message(*[data_url(png_bytes(i)) for i in range(3)]),
    "domain not allowed": lambda host: image_message(
        host.replace("127.0.0.1", "localhost") + "/cat.png"
    ),  # fmt: skip
    "url times out": lambda host: image_message(f"{host}/slow.png"),
    "url too large": lambda host: image_message(f"{host}/big.png"),
    "url not found": lambda host: image_message(f"{host}/missing.png"),
    "not a url": lambda host: image_message("ftp://127.0.0.1/cat.png"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_image_input_is_a_400_and_the_server_keeps_serving(vision_server, image_host, case):
    with pytest.raises(openai.BadRequestError) as info:
        chat(vision_server, BAD_INPUTS[case](image_host))
    error = info.value.body
    assert info.value.status_code == 400
    assert error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert error["message"]
    reply = chat(vision_server, [{"role": "user", "content": "Hello"}])
    assert reply.usage.completion_tokens == 6


def test_a_bad_image_does_not_disturb_requests_in_flight(vision_server):
    import concurrent.futures

    good = image_message(data_url(png_bytes(4)))
    expected = chat(vision_server, good).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        goods = [pool.submit(chat, vision_server, good) for _ in range(3)]
        bad = pool.submit(chat, vision_server, image_message(data_url(b"corrupt")))
        assert [f.result().choices[0].message.content for f in goods] == [expected] * 3
        with pytest.raises(openai.BadRequestError):
            bad.result()


def test_encoder_metrics_are_exported(vision_server):
    chat(vision_server, image_message(data_url(png_bytes(6))))
    assert vision_server.metric("lmserve:encoder_inputs_total") >= 1
    assert vision_server.metric("lmserve:encoder_cache_queries_total") >= 1
    assert vision_server.metric("lmserve:encoder_time_seconds_total") > 0


def test_image_to_a_text_only_model_is_a_400(server):
    with pytest.raises(openai.BadRequestError) as info:
        chat(server, image_message(data_url(png_bytes(0))))
    assert "text-only" in info.value.body["message"]
    assert chat(server, [{"role": "user", "content": "Hello"}]).usage.completion_tokens == 6
