"""LLaVA-family models against the oracle (DESIGN.md §6): greedy token ids identical to HF
transformers `generate` in float32 on CPU, for batches mixing text-only prompts and prompts with
one and two images — with chunked prefill splitting an image's placeholder range, with prefix
caching (the same image hits, a different image at the same positions misses), under
preemption — and the encoder runs once per distinct image."""

from __future__ import annotations

import io

import pytest
import torch

from lmserve import LLM, SamplingParams
from tests.tiny_vlm import IMAGE_TOKEN_ID, TOKENS_PER_IMAGE, make_image, make_tiny_llava

MAX_TOKENS = 10
MODELS = [("clip", "llama"), ("siglip", "qwen2")]
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    built: dict[tuple[str, str], str] = {}

    def build(vision: str = "clip", text: str = "llama") -> str:
        if (vision, text) not in built:
            path = tmp_path_factory.mktemp(f"llava-{vision}-{text}")
            built[vision, text] = make_tiny_llava(path, vision, text)
        return built[vision, text]

    return build


def mixed_prompts() -> list[dict]:
    """Text-only, one image and two images (one of them shared), of mixed lengths."""
    x = IMAGE_TOKEN_ID
    return [
        {"prompt_token_ids": [1, 5, 6, x, 7, 8], "multi_modal_data": {"image": make_image(0)}},
        {"prompt_token_ids": [1, 9, 12, 13, 40, 41, 42]},
        {
            "prompt_token_ids": [1, 9, x, 10, 11, 12, x, 11],
            "multi_modal_data": {"image": [make_image(1), make_image(0)]},
        },
        {"prompt_token_ids": [1, x, *range(20, 50)], "multi_modal_data": {"image": make_image(2)}},
        {"prompt_token_ids": [1, 77]},
    ]


_hf_cache: dict[tuple, list[int]] = {}


def hf_greedy(model_dir: str, prompt: dict) -> list[int]:
    """HF `generate` for one prompt (placeholders expanded as LlavaProcessor does)."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    images = prompt.get("multi_modal_data", {}).get("image", [])
    images = images if isinstance(images, list) else [images]
    ids: list[int] = []
    for t in prompt["prompt_token_ids"]:
        ids += [t] * (TOKENS_PER_IMAGE if t == IMAGE_TOKEN_ID else 1)
    key = (model_dir, tuple(ids), tuple(im.tobytes() for im in images))
    if key not in _hf_cache:
        model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
        kwargs = {}
        if images:
            processor = AutoImageProcessor.from_pretrained(model_dir)
            kwargs["pixel_values"] = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.eval().generate(
                torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=3,
                **kwargs,
            )  # fmt: skip
        _hf_cache[key] = out[0, len(ids) :].tolist()
    return _hf_cache[key]


def make_llm(model_dir: str, **kwargs) -> LLM:
    defaults = dict(dtype="float32", device="cpu", max_model_len=256, cpu_kvcache_space_gib=0.01)
    return LLM(model_dir, **{**defaults, **kwargs})


def scheduler_of(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.scheduler


def runner_of(llm: LLM):
    return llm.llm_engine.engine_core.engine_core.executor.worker.model_runner


def count_encoded_images(llm: LLM) -> list[int]:
    """Wrap the model's `embed_images`; the returned list holds one batch size per call."""
    model = runner_of(llm).model
    calls: list[int] = []
    original = model.embed_images

    def counting(pixel_values):
        calls.append(len(pixel_values))
        return original(pixel_values)

    model.embed_images = counting
    return calls


def assert_matches_hf(llm: LLM, model_dir: str, prompts: list[dict]) -> list:
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(model_dir, prompt), prompt["prompt_token_ids"]
    return outs


@pytest.mark.parametrize("vision,text", MODELS)
def test_mixed_text_and_image_batch_matches_hf(tiny_llava, vision, text):
    model_dir = tiny_llava(vision, text)
    llm = make_llm(model_dir)
    assert_matches_hf(llm, model_dir, mixed_prompts())


@pytest.mark.parametrize("vision,text", MODELS)
def test_chunked_prefill_splitting_image_ranges_matches_hf(tiny_llava, vision, text):
    """A 7-token budget splits every 16-token image range over three steps; the encoder
    budget of one image makes steps stop before a second image."""
    model_dir = tiny_llava(vision, text)
    llm = make_llm(
        model_dir, max_num_batched_tokens=7, block_size=4, max_num_encoder_input_tokens=16
    )
    assert scheduler_of(llm).encoder_budget == TOKENS_PER_IMAGE
    assert_matches_hf(llm, model_dir, mixed_prompts())


def test_prefix_cache_hits_same_image_and_misses_a_different_one(tiny_llava):
    model_dir = tiny_llava("clip", "llama")
    llm = make_llm(model_dir, block_size=4)
    suffix = list(range(20, 40))
    same = {"prompt_token_ids": [1, 5, IMAGE_TOKEN_ID, *suffix]}
    first = {**same, "multi_modal_data": {"image": make_image(0)}}
    again = {**same, "multi_modal_data": {"image": make_image(0)}}  # equal pixels, new object
    other = {**same, "multi_modal_data": {"image": make_image(5)}}
    calls = count_encoded_images(llm)
    assert_matches_hf(llm, model_dir, [first])
    hit, miss = (
        assert_matches_hf(llm, model_dir, [again]),
        assert_matches_hf(llm, model_dir, [other]),
    )
    num_prompt = 2 + TOKENS_PER_IMAGE + len(suffix)
    assert hit[0].num_cached_tokens == (num_prompt - 1) // 4 * 4  # every full block
    assert miss[0].num_cached_tokens == 0  # block 0 holds the image's first placeholders
    assert sum(calls) == 2  # image 0 once (the hit reads KV, not the encoder), image 5 once


def test_different_images_never_share_kv_past_the_text_prefix(tiny_llava):
    model_dir = tiny_llava("clip", "llama")
    llm = make_llm(model_dir, block_size=4)
    prefix = list(range(20, 28))  # two full blocks of text before the image
    ids = [1, *prefix, IMAGE_TOKEN_ID, 50, 51]
    assert_matches_hf(
        llm, model_dir, [{"prompt_token_ids": ids, "multi_modal_data": {"image": make_image(0)}}]
    )
    (out,) = assert_matches_hf(llm, model_dir, [{"prompt_token_ids": ids, "multi_modal_data": {"image": make_image(3)}}])  # fmt: skip
    assert out.num_cached_tokens == 8  # the text blocks only (the image starts at 9)


def test_preemption_with_images_matches_hf(tiny_llava):
    model_dir = tiny_llava("siglip", "qwen2")
    # 16 blocks x 4 = 64 slots for 5 prompts of 114 tokens: preemption is unavoidable.
    llm = make_llm(
        model_dir, block_size=4, num_gpu_blocks_override=16, max_model_len=64,
        max_num_batched_tokens=24,
    )  # fmt: skip
    assert_matches_hf(llm, model_dir, mixed_prompts())
    assert scheduler_of(llm).num_preemptions > 0


def test_encoder_runs_once_per_distinct_image(tiny_llava):
    model_dir = tiny_llava("clip", "llama")
    llm = make_llm(model_dir)
    calls = count_encoded_images(llm)
    shared, other = make_image(7), make_image(8)
    prompts = [
        {"prompt_token_ids": [1, 5 + i, IMAGE_TOKEN_ID, 9], "multi_modal_data": {"image": shared}}
        for i in range(4)
    ] + [
        {
            "prompt_token_ids": [1, IMAGE_TOKEN_ID, 4, IMAGE_TOKEN_ID],
            "multi_modal_data": {"image": [other, shared]},
        }
    ]
    assert_matches_hf(llm, model_dir, prompts)
    assert sum(calls) == 2
    cache = scheduler_of(llm).encoder_cache
    assert (cache.queries, cache.hits) == (6, 4)
    assert not any(cache.cached.values())  # every reference released


def test_llm_chat_with_image_parts_matches_generate(tiny_llava):
    import base64

    model_dir = tiny_llava("clip", "llama")
    llm = make_llm(model_dir)
    buffer = io.BytesIO()
    make_image(0).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "What is in the picture?"},
            ],
        }
    ]
    (chat,) = llm.chat(messages, GREEDY, use_tqdm=False)
    tokenizer = llm.get_tokenizer()
    text = "<|user|><image>\nWhat is in the picture?</s><|assistant|>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": make_image(0)}}
    assert chat.outputs[0].token_ids == hf_greedy(model_dir, prompt)


def test_bad_image_inputs_raise_and_leave_the_engine_working(tiny_llava, tiny_model_dir):
    model_dir = tiny_llava("clip", "llama")
    llm = make_llm(model_dir, limit_mm_per_prompt={"image": 2})
    x = IMAGE_TOKEN_ID
    with pytest.raises(ValueError, match="more than this server allows"):
        llm.generate(
            {"prompt_token_ids": [1, x, x, x], "multi_modal_data": {"image": [make_image(0)] * 3}}
        )
    with pytest.raises(ValueError, match="cannot decode"):
        llm.generate({"prompt_token_ids": [1, x], "multi_modal_data": {"image": b"not an image"}})
    with pytest.raises(ValueError, match="1 image placeholders"):
        llm.generate({"prompt_token_ids": [1, x], "multi_modal_data": {"image": [make_image(0)] * 2}})  # fmt: skip
    assert_matches_hf(llm, model_dir, mixed_prompts()[:2])
    text_llm = make_llm(tiny_model_dir("llama"))
    with pytest.raises(ValueError, match="text-only"):
        text_llm.generate({"prompt_token_ids": [1, 5], "multi_modal_data": {"image": make_image(0)}})  # fmt: skip
