"""Model registry: HF `architectures[0]` name -> lmserve model class."""

from __future__ import annotations

from torch import nn

from lmserve.model.models.llama import LlamaForCausalLM
from lmserve.model.models.llava import LlavaForConditionalGeneration
from lmserve.model.models.qwen2 import Qwen2ForCausalLM
from lmserve.model.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,  # Mistral is Llama's architecture
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    # vision-language: a vision tower + projector in front of one of the above
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
}


def get_model_class(hf_config) -> type[nn.Module]:
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"model architecture(s) {architectures} are not supported; "
        f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )


__all__ = ["MODEL_REGISTRY", "get_model_class"]
