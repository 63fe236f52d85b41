"""A transformers config as plain attributes, and the language model's part of one. No
imports beyond the standard library: the EngineCore process reads configs without transformers,
and both `lmserve.config` and the model code use these."""

from __future__ import annotations

from typing import Any


class PlainHFConfig:
    """The attributes of a transformers PretrainedConfig, without transformers."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def get_text_config(self, *args: Any, **kwargs: Any) -> PlainHFConfig:
        return text_config_of(self)


def text_config_of(hf_config: Any) -> Any:
    """The language model's part of a config: `text_config` of a vision-language model (as
    an attribute view when it is a plain dict), else the config itself."""
    text = getattr(hf_config, "text_config", None)
    if text is None:
        return hf_config
    return PlainHFConfig(text) if isinstance(text, dict) else text
