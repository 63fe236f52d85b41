"""Parameter helpers shared by the layers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

WeightLoader = Callable[..., None]


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """Copy a whole checkpoint tensor into `param` (casting dtype, moving device)."""
    assert shard_id is None, f"unsharded parameter got shard_id={shard_id!r}"
    if param.shape != loaded_weight.shape:
        raise ValueError(
            f"checkpoint tensor has shape {tuple(loaded_weight.shape)}, "
            f"parameter expects {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(loaded_weight)


def make_param(*shape: int, weight_loader: WeightLoader = default_weight_loader) -> nn.Parameter:
    """An uninitialised parameter on the current default device/dtype, with its weight loader.

    Left uninitialised on purpose: the loader fills every parameter (checkpoint or dummy values),
    and skipping an init pass keeps building an 8B model on the GPU fast.
    """
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = weight_loader
    return param
