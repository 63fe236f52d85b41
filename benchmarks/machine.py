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


def device_info(device: str, **extra: object) -> dict[str, object]:
    """`cpu_machine_info`, plus the card (name, memory, compute capability, driver-side CUDA
    and torch versions) when `device` is CUDA."""
    info = cpu_machine_info(device, **extra)
    if device.startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_compute_capability=f"{props.major}.{props.minor}",
            gpu_count=torch.cuda.device_count(),
            cuda=torch.version.cuda,
            torch=torch.__version__,
        )
    return info


def write_result(path: str, report: dict) -> None:
    """Write a benchmark's JSON (making its folder) and say where."""
    import json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")
