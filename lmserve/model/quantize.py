"""Pack a loaded model's weights for the CPU (see layers/quantization.py for the formats).

    quantize_model(model, "gguf", folder)          4-bit GGUF tensors keep their own codes
                                                   (exact); everything else int8 per group of 32
                                                   (exact for Q8_0)
    quantize_model(model, "int8")                  every linear layer and the vocabulary int8

The 4-bit codes travel through the model's own `load_weights`, into stand-in parameters of the
codes' and the scales' shapes, so tensor-parallel slicing and the fusion of q/k/v and gate/up
work exactly as for float weights. A fused layer whose parts are not all 4-bit (a Q4_K_M file
keeps some in Q6_K) is requantized to int8 from its float values instead.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch import nn

from lmserve.model.layers.embedding import LMHead, VocabEmbedding
from lmserve.model.layers.linear import _Linear
from lmserve.model.layers.quantization import (
    GROUP_SIZE,
    Int4Weight,
    Int8Weight,
    placeholder_like,
)

logger = logging.getLogger(__name__)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, folder: str | None = None) -> dict[str, int]:
    """Replace the float weights of every linear layer and the vocabulary tables by packed ones
    ("gguf": the 4-bit codes saved in the converted GGUF `folder`, see gguf_loader),
    in place (a layer of a shape the kernel cannot take stays float: `packable`). Returns counts
    {"int4": layers, "int8": layers, "float": layers, "bytes": packed bytes}."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, _Linear)}
    int4: dict[str, Int4Weight] = {}
    if method == "gguf":
        if folder is None:
            raise ValueError("quantization 'gguf' needs the folder the GGUF was converted into")
        int4 = _int4_weights(model, linears, folder)
    elif method != "int8":
        raise ValueError(f"cannot pack weights with quantization {method!r}")
    summary = {"int4": 0, "int8": 0, "float": 0, "bytes": 0}
    for name, module in linears.items():
        packed = int4.get(name)
        if packed is None and not packable(module.weight):
            summary["float"] += 1
            continue
        packed = packed or Int8Weight.from_float(module.weight)
        module.packed = packed
        module.weight = placeholder_like(module.weight)
        summary[packed.kind] += 1
        summary["bytes"] += packed.nbytes()
    summary["bytes"] += _pack_vocabulary(model)
    logger.info(
        "packed weights (%s): %d int4 and %d int8 layers, %.1f MB",
        method, summary["int4"], summary["int8"], summary["bytes"] / 1e6,
    )  # fmt: skip
    return summary


def _int4_weights(
    model: nn.Module, linears: dict[str, _Linear], folder: str
) -> dict[str, Int4Weight]:
    """Int4 weights of the linear layers whose every checkpoint part is a 4-bit GGUF tensor."""
    from lmserve.model.gguf_loader import load_int4_codes

    tensors = load_int4_codes(folder)
    if not tensors:
        return {}
    fields = []
    for index, dtype in ((0, torch.uint8), (1, torch.float32), (2, torch.float32)):
        fields.append(_load_through_model(model, linears, tensors, index, dtype))
    (codes, complete), (scales, _), (zeros, _) = fields
    return {
        name: Int4Weight(codes[name], scales[name], zeros[name])
        for name in linears
        if f"{name}.weight" in complete
    }


def _load_through_model(
    model: nn.Module,
    linears: dict[str, _Linear],
    tensors: list[tuple[str, tuple]],
    index: int,
    dtype: torch.dtype,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Run `model.load_weights` over part `index` of each tensor (codes, scales or zeros), into
    stand-ins for every linear and vocabulary weight. Returns each linear's filled stand-in and
    the names of parameters whose every shard arrived."""
    swapped = {m: m.weight for m in _weight_owners(model, linears)}
    standins: dict[str, torch.Tensor] = {}
    try:
        for module, weight in swapped.items():
            rows, cols = weight.shape
            cols = cols if index == 0 else cols // GROUP_SIZE
            standin = nn.Parameter(torch.zeros(rows, cols, dtype=dtype), requires_grad=False)
            standin.weight_loader = weight.weight_loader
            if hasattr(weight, "shard_ids"):
                standin.shard_ids = weight.shard_ids
            module.weight = standin
        for name, module in linears.items():
            standins[name] = module.weight
        loaded = model.load_weights(_part(tensors, index))
    finally:
        for module, weight in swapped.items():
            module.weight = weight
    return standins, loaded


def _part(tensors: list[tuple[str, tuple]], index: int) -> Iterator[tuple[str, torch.Tensor]]:
    for name, parts in tensors:
        yield name, torch.from_numpy(parts[index])


def _weight_owners(model: nn.Module, linears: dict[str, _Linear]) -> list[nn.Module]:
    """Modules whose `.weight` a checkpoint tensor may load into: the linear layers, the
    embedding and an untied LM head (a tied head shares the embedding's parameter)."""
    owners: list[nn.Module] = list(linears.values())
    for module in model.modules():
        if isinstance(module, VocabEmbedding) or (
            isinstance(module, LMHead) and module.tied_to is None
        ):
            owners.append(module)
    return owners


def packable(weight: torch.Tensor) -> bool:
    """The int4 kernel takes [N, K] with K whole groups of 32 and N a multiple of 16."""
    n, k = weight.shape
    return k % GROUP_SIZE == 0 and n % 16 == 0


def _pack_vocabulary(model: nn.Module) -> int:
    """The embedding and LM head as int8 (one table when tied). Returns packed bytes."""
    total = 0
    vocab = [m for m in model.modules() if isinstance(m, (LMHead, VocabEmbedding))]
    for module in vocab:
        if isinstance(module, LMHead) and module.tied_to is not None and packable(module.weight):
            embed = module.tied_to
            embed.packed = module.packed = Int8Weight.from_float(embed.weight)
            embed.weight = placeholder_like(embed.weight)
            module.weight = embed.weight
            total += module.packed.nbytes()
    for module in vocab:
        if module.packed is None and packable(module.weight):
            module.packed = Int8Weight.from_float(module.weight)
            module.weight = placeholder_like(module.weight)
            total += module.packed.nbytes()
    return total
