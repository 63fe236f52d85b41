"""lmserve: an LLM inference engine with vLLM's interface."""

from lmserve.entrypoints.llm import LLM
from lmserve.outputs import CompletionOutput, RequestOutput
from lmserve.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]
