"""Attention backends: the interface (backend.py), the PyTorch reference (torch_backend.py)."""

from lmserve.attention.backend import AttentionBackend, AttentionMetadata, ForwardContext


def get_attention_backend(device: str) -> AttentionBackend:
    """The backend for `device`. CPU (and, until the GPU kernels land, CUDA) gets the reference."""
    from lmserve.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()


__all__ = ["AttentionBackend", "AttentionMetadata", "ForwardContext", "get_attention_backend"]
