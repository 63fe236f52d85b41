"""Models, their layers, and the weight loader."""

from lmserve.model.loader import get_kv_cache_spec, load_model, resolve_model_path
from lmserve.model.models import MODEL_REGISTRY, get_model_class

__all__ = [
    "MODEL_REGISTRY",
    "get_kv_cache_spec",
    "get_model_class",
    "load_model",
    "resolve_model_path",
]
