"""Where `lmserve serve` spends its time before the EngineCore gets its configuration: each
front-end phase in order (imports, the spawned EngineCore process, building the configuration,
importing the server), timed in a fresh interpreter, plus the EngineCore process's own import
time. 8B shape, dummy weights. Prints a table and writes JSON; asserts nothing.

    python benchmarks/serve_startup_phases.py --out startup_phases.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

_FRONT_END = r"""
import json, sys, time
t0 = time.perf_counter()
phases = {}
def mark(name):
    phases[name] = round(time.perf_counter() - t0, 3)
from lmserve.engine.launcher import EngineLauncher
mark("import launcher")
launcher = EngineLauncher()
mark("spawn EngineCore process")
from lmserve.config import EngineConfig
mark("import lmserve.config")
config = EngineConfig.from_kwargs(sys.argv[1], load_format="dummy", dtype="bfloat16")
mark("build configuration")
import lmserve.entrypoints.openai.server
mark("import the server")
launcher.cancel()
print(json.dumps(phases))
"""

_ENGINE_IMPORTS = r"""
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from lmserve.core.engine_core import run_engine_core
t2 = time.perf_counter()
torch.cuda.init() if torch.cuda.is_available() else None
t3 = time.perf_counter()
print(json.dumps({"import torch": round(t1 - t0, 3), "import the engine": round(t2 - t1, 3),
                  "cuda init": round(t3 - t2, 3)}))
"""


def _run(code: str, *args: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process total"] = round(time.perf_counter() - start, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="serve_startup_phases.json")
    args = parser.parse_args()
    from benchmarks.gpu_shapes import write_shape

    with tempfile.TemporaryDirectory() as tmp:
        path = write_shape(tmp, "8b")
        result = {
            "front_end_cumulative_s": _run(_FRONT_END, path),
            "engine_process_s": _run(_ENGINE_IMPORTS),
            "front_end_again_s": _run(_FRONT_END, path),  # bytecode caches warm now
        }
    for part, phases in result.items():
        print(part)
        for name, seconds in phases.items():
            print(f"  {name:<28} {seconds:8.3f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
