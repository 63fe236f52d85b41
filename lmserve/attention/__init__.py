"""Attention backends: the interface (backend.py), the PyTorch reference (torch_backend.py) and
the Triton kernels for CUDA (triton_backend.py, imported only when chosen)."""

import importlib.util

from lmserve import envs
from lmserve.attention.backend import AttentionBackend, AttentionMetadata, ForwardContext

ATTENTION_BACKENDS = ("torch", "triton")


def get_attention_backend(device: str) -> AttentionBackend:
    """The backend for `device` ("cpu" | "cuda"): `LMSERVE_ATTENTION_BACKEND` when set, else
    Triton on CUDA when triton is installed, else the PyTorch reference."""
    choice = envs.LMSERVE_ATTENTION_BACKEND
    triton_installed = importlib.util.find_spec("triton") is not None
    if choice is None:
        choice = "triton" if device == "cuda" and triton_installed else "torch"
    if choice == "torch":
        from lmserve.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    if choice == "triton":
        if device != "cuda":
            raise ValueError(
                f"LMSERVE_ATTENTION_BACKEND=triton needs device 'cuda', not {device!r}"
            )
        if not triton_installed:
            raise ValueError("LMSERVE_ATTENTION_BACKEND=triton, but triton is not installed")
        from lmserve.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    raise ValueError(
        f"LMSERVE_ATTENTION_BACKEND={choice!r}: choose one of {', '.join(ATTENTION_BACKENDS)}"
    )


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "ForwardContext",
    "get_attention_backend",
]
