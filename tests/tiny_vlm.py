"""Tiny random LLaVA checkpoints (config + safetensors + tokenizer + image processor) for tests.

    path = make_tiny_llava(tmp_path / "llava", vision="clip", text="llama")
    LlavaForConditionalGeneration.from_pretrained(path); AutoImageProcessor.from_pretrained(path)

A CLIP or SigLIP vision tower on 28x28 images with 7x7 patches (16 patches, so 16 placeholder
tokens per image: CLIP drops its CLS token with the "default" strategy, SigLIP has none and
uses "full"), the two-layer projector, and a tiny Llama or Qwen2 language model. The tokenizer
is tests/tiny_models.py's plus the special token `<image>` (id IMAGE_TOKEN_ID).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from tests.tiny_models import TINY_CONFIG, make_tiny_tokenizer

IMAGE_SIZE, PATCH_SIZE = 28, 7
IMAGE_TOKEN = "<image>"
VOCAB_SIZE = 512
IMAGE_TOKEN_ID = VOCAB_SIZE  # appended after the BPE vocabulary
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2
# Renders string contents; images arrive as `<image>` placeholders in the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_VISION: dict[str, dict[str, Any]] = {
    "clip": dict(feature_layer=-2, strategy="default"),
    "siglip": dict(feature_layer=-1, strategy="full"),
}


def tiny_llava_config(vision: str = "clip", text: str = "llama"):
    import transformers

    vision_kwargs = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
    )  # fmt: skip
    if vision == "clip":
        vision_config = transformers.CLIPVisionConfig(**vision_kwargs, projection_dim=32)
    else:
        vision_config = transformers.SiglipVisionConfig(**vision_kwargs, vision_use_head=False)
    text_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[text]
    text_config = text_cls(**{**TINY_CONFIG, "vocab_size": VOCAB_SIZE + 1})
    text_config.architectures = [text_cls.__name__.replace("Config", "ForCausalLM")]
    config = transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=_VISION[vision]["feature_layer"],
        vision_feature_select_strategy=_VISION[vision]["strategy"],
        projector_hidden_act="gelu",
        image_seq_length=TOKENS_PER_IMAGE,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return config


def make_tiny_llava(
    path: str | os.PathLike, vision: str = "clip", text: str = "llama", seed: int = 0
) -> str:
    """Write the model (float32 safetensors), tokenizer and image processor into `path`."""
    import transformers

    path = os.fspath(path)
    config = tiny_llava_config(vision, text)
    with torch.random.fork_rng(devices=[]):
        model = transformers.LlavaForConditionalGeneration(config).to(torch.float32).eval()
    _randomize_weights(model, seed)
    model.save_pretrained(path)
    tokenizer = make_tiny_tokenizer(VOCAB_SIZE)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == IMAGE_TOKEN_ID
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    if vision == "clip":
        processor = transformers.CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        )
    else:
        processor = transformers.SiglipImageProcessor(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
    processor.save_pretrained(path)
    return path


@torch.no_grad()
def _randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """tests/tiny_models.py's rule, extended to the vision tower's conv and 1-D embeddings:
    norms ~ 1 + N(0, 0.2), biases ~ N(0, 0.1), embeddings ~ N(0, 1), matrices and the patch
    conv ~ N(0, 1.5 / sqrt(fan_in))."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if "norm" in name and name.endswith("weight"):
            param.copy_(1.0 + 0.2 * noise)
        elif name.endswith("bias"):
            param.copy_(0.1 * noise)
        elif "embed_tokens" in name or param.dim() == 1 or "position_embedding" in name:
            param.copy_(noise)
        else:  # [out, in] or the conv's [out, in, k, k]
            param.copy_(noise * 1.5 / param[0].numel() ** 0.5)


def make_image(seed: int, size: tuple[int, int] = (40, 32)):
    """A random RGB PIL image (not square, so resizing and cropping matter)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
