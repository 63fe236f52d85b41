"""LLaVA (Liu et al., 2023) as HF transformers defines it (`LlavaForConditionalGeneration`):
a CLIP or SigLIP vision tower, a two-layer projector, and a Llama / Mistral / Qwen2 language
model.

    features = vision_tower(pixels).hidden_states[vision_feature_layer]  # [n, patches(+1), d_v]
    features = features[:, 1:] if strategy == "default" else features     # drop CLIP's CLS
    image_embeds = linear_2(act(linear_1(features)))                      # [n, tokens, d]
    x = embed(input_ids), with x[placeholder positions] = image_embeds rows
    ... then the language model, unchanged (paged KV, our attention backends).

The vision tower is transformers' own CLIPVisionModel / SiglipVisionModel (same modules, same
attention implementation as the HF reference, so float32 parity is exact); it is built with
only the layers up to `vision_feature_layer`, so no layer runs whose output is thrown away. The
projector and the language model are ours. The model runner calls `embed_images` for the
images a step encodes and `forward(..., inputs_embeds=...)` for steps that read them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from lmserve.attention.backend import ForwardContext
from lmserve.hf_config import text_config_of
from lmserve.model.models.llama import LlamaForCausalLM
from lmserve.model.models.qwen2 import Qwen2ForCausalLM

# The vision towers transformers builds for LLaVA, by their config's model_type.
_VISION_TOWERS = {
    "clip_vision_model": ("CLIPVisionConfig", "CLIPVisionModel"),
    "siglip_vision_model": ("SiglipVisionConfig", "SiglipVisionModel"),
}


# The language models a LLaVA checkpoint may carry (text_config.architectures[0]).
_LANGUAGE_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}
_TEXT_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def image_token_id(hf_config) -> int:
    """The placeholder token of images (`image_token_id`, `image_token_index` in old configs)."""
    value = getattr(hf_config, "image_token_id", None)
    return int(value if value is not None else hf_config.image_token_index)


def _vision_value(hf_config, name: str) -> Any:
    vision = hf_config.vision_config
    return vision[name] if isinstance(vision, dict) else getattr(vision, name)


def has_cls_token(hf_config) -> bool:
    return _vision_value(hf_config, "model_type") == "clip_vision_model"


def num_image_tokens(hf_config) -> int:
    """Placeholder tokens of one image: one per patch (+ CLIP's CLS unless the "default"
    strategy drops it), as LlavaProcessor counts them."""
    patches = (
        _vision_value(hf_config, "image_size") // _vision_value(hf_config, "patch_size")
    ) ** 2
    cls = 1 if has_cls_token(hf_config) else 0
    default = getattr(hf_config, "vision_feature_select_strategy", "default") == "default"
    return patches + cls - (1 if default else 0)


def _feature_layers(hf_config) -> list[int]:
    layers = hf_config.vision_feature_layer
    return [layers] if isinstance(layers, int) else list(layers)


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, in_features: int, hidden_size: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=bias)
        self.act = nn.GELU() if act == "gelu" else _hf_activation(act)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [n, tokens, d_v * layers]
        return self.linear_2(self.act(self.linear_1(features)))  # [n, tokens, hidden_size]


def _hf_activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]


class LlavaForConditionalGeneration(nn.Module):
    def __init__(self, hf_config) -> None:
        super().__init__()
        self.config = hf_config
        self.text_config = text_config_of(hf_config)
        self.image_token_id = image_token_id(hf_config)
        self.strategy = getattr(hf_config, "vision_feature_select_strategy", "default")
        self.vision_tower, self.feature_layers = _build_vision_tower(hf_config)
        vision_hidden = _vision_value(hf_config, "hidden_size")
        self.multi_modal_projector = LlavaMultiModalProjector(
            vision_hidden * len(self.feature_layers),
            self.text_config.hidden_size,
            getattr(hf_config, "projector_hidden_act", "gelu"),
            bool(getattr(hf_config, "multimodal_projector_bias", True)),
        )
        if not getattr(self.text_config, "architectures", None):  # old configs name only the type
            self.text_config.architectures = [_TEXT_ARCHITECTURES[self.text_config.model_type]]
        architecture = self.text_config.architectures[0]
        if architecture not in _LANGUAGE_MODELS:
            raise ValueError(
                f"LLaVA with a {architecture} language model is not supported; supported: "
                f"{sorted(_LANGUAGE_MODELS)}"
            )
        self.language_model = _LANGUAGE_MODELS[architecture](self.text_config)

    # ---- the vision side -------------------------------------------------------------------
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_images, channels, height, width] -> [num_images, tokens, hidden_size]."""
        outputs = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        hidden = outputs.hidden_states  # (embeddings, layer 1, ...), each [n, patches(+1), d_v]
        features = [hidden[i] for i in self.feature_layers]
        if self.strategy == "default":
            features = [f[:, 1:] for f in features]  # drop CLIP's CLS token
        features = features[0] if len(features) == 1 else torch.cat(features, dim=-1)
        return self.multi_modal_projector(features)

    # ---- the language side -----------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.embed_input_ids(input_ids)  # [num_tokens, hidden_size]

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        ctx: ForwardContext,
        inputs_embeds: torch.Tensor | None = None,  # [num_tokens, hidden_size]
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        return self.language_model(input_ids, positions, ctx, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden_states)

    # ---- weights ---------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF checkpoints in either layout: `language_model.model.*` / `vision_tower.
        vision_model.*` (transformers 4) or `model.language_model.*` / `model.vision_tower.*`
        (transformers 5); vision layers past the last one used are skipped."""
        loaded: set[str] = set()
        params = dict(self.named_parameters())
        # transformers < 5.2x nests the tower's modules under `vision_model.`
        inner = "vision_model." if hasattr(self.vision_tower, "vision_model") else ""
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        num_layers = len(tower.encoder.layers)

        def language_weights() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                part, rest = _split_checkpoint_name(name)
                if part == "language_model":
                    yield rest, tensor
                    continue
                if part == "vision_tower" and _vision_layer(rest) >= num_layers:
                    continue
                if part == "vision_tower" and rest.startswith("head."):
                    continue  # SigLIP's pooling head: LLaVA never uses it
                target = (
                    f"vision_tower.{inner}{rest}" if part == "vision_tower" else f"{part}.{rest}"
                )
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name!r} matches no parameter of LLaVA")
                with torch.no_grad():
                    params[target].copy_(tensor)
                loaded.add(target)

        inner = self.language_model.load_weights(language_weights())
        return loaded | {f"language_model.{n}" for n in inner}


def _split_checkpoint_name(name: str) -> tuple[str, str]:
    """(part, name inside it): part is language_model, vision_tower or multi_modal_projector;
    the language model's names come back as its own (`model.layers...`, `lm_head.weight`)."""
    if name.startswith("model."):  # transformers 5: model.{part}.*, lm_head.* at the top
        name = name[len("model.") :]
        if name.startswith("language_model."):
            return "language_model", "model." + name[len("language_model.") :]
    elif name.startswith("lm_head."):
        return "language_model", name
    part, _, rest = name.partition(".")
    if part == "vision_tower" and rest.startswith("vision_model."):
        rest = rest[len("vision_model.") :]
    return part, rest


def _vision_layer(name: str) -> int:
    """The encoder layer a vision tower tensor belongs to; -1 for the others."""
    prefix = "encoder.layers."
    if not name.startswith(prefix):
        return -1
    return int(name[len(prefix) :].split(".", 1)[0])


def _build_vision_tower(hf_config) -> tuple[nn.Module, list[int]]:
    """transformers' vision model with the layers the features need, and the hidden-state
    indices (into its `hidden_states`, 0 = embeddings) of the feature layers."""
    import transformers

    vision = hf_config.vision_config
    values = dict(vision) if isinstance(vision, dict) else vision.to_dict()
    config_name, model_name = _VISION_TOWERS[values["model_type"]]
    total = values["num_hidden_layers"]
    indices = [i if i >= 0 else total + 1 + i for i in _feature_layers(hf_config)]
    values["num_hidden_layers"] = max(max(indices), 1)
    if values["model_type"] == "siglip_vision_model":
        values["vision_use_head"] = False  # the pooling head: LLaVA never uses it
    values.pop("model_type", None)
    values.pop("transformers_version", None)
    config = getattr(transformers, config_name)(**values)
    config._attn_implementation = "sdpa"  # what HF's LLaVA runs by default
    return getattr(transformers, model_name)(config), indices
