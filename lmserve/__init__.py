"""lmserve: an LLM inference engine with vLLM's interface.

`LLM` is imported on first use, so `import lmserve` (and tools that need only messages or
sampling parameters, like the ring buffer's readers or the bench client) stays light.
"""

from typing import TYPE_CHECKING, Any

from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from lmserve.entrypoints.llm import LLM

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from lmserve.entrypoints.llm import LLM

        return LLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
