"""What every CPU benchmark records about the machine it ran on (imported by the scripts here,
which run as `python benchmarks/<script>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import os
import platform
import sys


def cpu_machine_info(device: str, **extra: object) -> dict[str, object]:
    """Platform, Python, core count and CPU model, plus `extra` fields of the benchmark."""
    info: dict[str, object] = {
        "device": device,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "cpu_count": os.cpu_count(),
        **extra,
    }
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)  # fmt: skip
    except OSError:
        model = None
    if model:
        info["cpu_model"] = model
    return info
