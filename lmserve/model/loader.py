"""Find a model's files, build the model on its device, and fill in its weights.

    resolve_model_path("Qwen/Qwen2.5-0.5B")       -> local folder (downloaded if needed)
    load_model(hf_config, path, dtype, device)    -> model in eval mode, every parameter loaded

Modules are built directly on the target device in the target dtype (default device and dtype
set for the duration of the build), so an 8B model never materialises on the CPU first.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import time
from collections.abc import Iterator

import torch
from torch import nn

from lmserve.distributed.parallel_state import get_tp_group
from lmserve.hf_config import text_config_of
from lmserve.model.models import get_model_class
from lmserve.model.models.llama import get_head_dim, get_num_kv_heads

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# Files a model needs: config, tokenizer, weights. Skips other formats' duplicate weights
# (Mistral's consolidated.safetensors, Meta's original/ folder).
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]
_IGNORE_PATTERNS = ["original/*", "consolidated*.safetensors"]
_SAFETENSORS_INDEX = "model.safetensors.index.json"


def resolve_model_path(model: str, revision: str | None = None) -> str:
    """A local folder is returned as-is; a .gguf file gives its converted HF folder (converted
    on first use, then cached: see gguf_loader); anything else is taken as a Hugging Face Hub id
    and downloaded into (or found in) the local HF cache."""
    if model.lower().endswith(".gguf") and not os.path.isdir(model):
        from lmserve.model.gguf_loader import cached_gguf_folder

        return cached_gguf_folder(model)
    if os.path.isdir(model):
        return model
    if model.startswith(("/", "./", "../", "~")) or os.path.exists(model):
        raise FileNotFoundError(f"model path {model!r} is not a folder")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            repo_id=model,
            revision=revision,
            allow_patterns=_DOWNLOAD_PATTERNS,
            ignore_patterns=_IGNORE_PATTERNS,
        )
    except Exception as e:  # offline, unknown repo, gated repo, bad revision, ...
        raise OSError(
            f"model {model!r} is not a local folder and could not be fetched from the Hugging "
            f"Face Hub (revision={revision!r}): {type(e).__name__}: {e}"
        ) from e


def get_kv_cache_spec(hf_config) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim): each layer's KV cache is two tensors
    [num_blocks, block_size, num_kv_heads, head_dim]."""
    hf_config = text_config_of(hf_config)  # a vision-language model's language model
    world = get_tp_group().world_size  # a rank caches only its KV heads (at least one)
    num_kv_heads = max(get_num_kv_heads(hf_config) // world, 1)
    return hf_config.num_hidden_layers, num_kv_heads, get_head_dim(hf_config)


def load_model(
    hf_config,
    model_path: str | None,
    dtype: torch.dtype,
    device: torch.device | str,
    load_format: str = "auto",
    seed: int = 0,
    quantization: str = "none",
) -> nn.Module:
    """Build the model for `hf_config.architectures` on `device` in `dtype` and load its weights.

    load_format: "auto" / "safetensors" read `model_path/*.safetensors` (one file, or the shards
    listed in model.safetensors.index.json); "dummy" fills every parameter with U(-1e-3, 1e-3)
    drawn from a generator seeded with `seed` (no checkpoint needed).
    quantization: "none" keeps float weights; "gguf" (the 4-bit tensors of the GGUF that
    `model_path` was converted from keep their codes) and "int8" pack the linear layers
    afterwards (lmserve/model/quantize.py).
    Raises if a parameter is left unloaded or a checkpoint tensor matches no parameter.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported (supported: {SUPPORTED_DTYPES})")
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format {load_format!r} is not supported (supported: {LOAD_FORMATS})"
        )
    model_cls = get_model_class(hf_config)
    device = torch.device(device)
    start = time.perf_counter()
    with _default_dtype(dtype), device:
        model = model_cls(hf_config)
    if load_format == "dummy":
        initialize_dummy_weights(model, seed)
    else:
        if model_path is None:
            raise ValueError(f"load_format={load_format!r} needs a model_path")
        loaded = model.load_weights(iterate_safetensors(model_path, device))
        missing = sorted(set(dict(model.named_parameters())) - loaded)
        if missing:
            raise ValueError(f"checkpoint in {model_path} lacks weights for parameters: {missing}")
    if quantization != "none":
        from lmserve.model.quantize import quantize_model

        quantize_model(model, quantization, model_path)
    logger.info(
        "loaded %s (%s, %s, format=%s) in %.2f s",
        model_cls.__name__, dtype, device, load_format, time.perf_counter() - start,
    )  # fmt: skip
    return model.eval()


def safetensors_files(model_path: str) -> list[str]:
    """The checkpoint files of a folder: those the shard index names, else every *.safetensors."""
    index_path = os.path.join(model_path, _SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        return [os.path.join(model_path, name) for name in sorted(set(weight_map.values()))]
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    files = [f for f in files if not os.path.basename(f).startswith("consolidated")]
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_path!r} (PyTorch .bin checkpoints are not "
            "supported; load_format='dummy' gives random weights)"
        )
    return files


def iterate_safetensors(
    model_path: str, device: torch.device | str = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the checkpoint, read lazily one tensor at a time,
    straight onto `device` (no CPU copy to convert or shard on the host)."""
    from safetensors import safe_open

    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for path in safetensors_files(model_path):
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


@torch.no_grad()
def initialize_dummy_weights(
    model: nn.Module, seed: int = 0, low: float = -1e-3, high: float = 1e-3
) -> None:
    """Fill every parameter with U(low, high) in place, deterministically from `seed`; small
    values keep activations finite through deep stacks. For speed work without a checkpoint."""
    generators: dict[torch.device, torch.Generator] = {}
    for param in model.parameters():  # a tied parameter is visited once
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        param.uniform_(low, high, generator=generators[param.device])


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
