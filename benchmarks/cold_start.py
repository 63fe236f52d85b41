"""`lmserve serve` from launch to the first token (8B shape, dummy weights, bf16, CUDA graphs on),
under chosen kernel-cache conditions, one run after another in fresh processes:

  empty    a new, empty Triton cache directory and the shipped kernel cache turned off
           (LMSERVE_SHIPPED_KERNELS=0): every Triton kernel is compiled during start-up
  shipped  a new, empty Triton cache directory with the kernels shipped in the package
  warm     the cache directory the previous run filled

Each run's engine log lines (configuration, load, memory profile, capture, ready) are kept. With
`--save-cache DIR` the first run's cache directory is copied to DIR (to build the shipped cache
from: `python -m lmserve.kernel_cache build DIR`). Prints a table, writes JSON; asserts nothing.

    python benchmarks/cold_start.py --runs empty,warm,shipped --out cold_start.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


# Sent after the first token when filling a cache to build a bundle from: waves of concurrent
# requests, so the kernels a server meets are compiled here and not at a user's first request of
# that kind. Triton compiles one variant per tile and per integer argument that is 1, a multiple
# of 16 or neither (batch sizes, query-length bounds): the waves give prefill batches of 1, 3, 16
# and 48 requests, prompts short and long (>= 1,024 tokens take the long tile), decode batches of
# every size as they finish, greedy and sampled rows.
TRAFFIC_WAVES = (1, 3, 16, 48, 1)


def _wave_bodies(size: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    bodies = []
    for i in range(size):
        prompt_len = rng.choice((16, rng.randint(17, 1000), rng.randint(1024, 1900)))
        bodies.append({
            "prompt": [1000 + (seed * 7919 + i * 131 + j) % 30000 for j in range(prompt_len)],
            "max_tokens": rng.randint(2, 48),
            "temperature": rng.choice((0.0, 1.0)),
            "ignore_eos": True,
        })  # fmt: skip
    return bodies


def serving_traffic(url: str, model: str) -> list[int]:
    """Send TRAFFIC_WAVES one after another, each wave's requests at once; their statuses."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    statuses: list[int] = []
    with httpx.Client(timeout=300) as client, ThreadPoolExecutor(max(TRAFFIC_WAVES)) as pool:
        for seed, size in enumerate(TRAFFIC_WAVES):
            send = lambda body: client.post(url, json={"model": model, **body}).status_code  # noqa: E731
            statuses += pool.map(send, _wave_bodies(size, seed))
    return statuses


def cold_start(path: str, traffic: bool = False) -> dict:
    """Launch `lmserve serve` and time the first token of a one-token completion; then, with
    `traffic`, send the waves of `serving_traffic`."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "lmserve.entrypoints.cli", "serve", path, "--load-format", "dummy",
        "--dtype", "bfloat16", "--skip-tokenizer-init", "--max-model-len", "2048",
        "--port", str(port), "--host", "127.0.0.1",
    ]  # fmt: skip
    env = dict(os.environ, LMSERVE_ENABLE_MULTIPROCESSING="1")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    body = {"model": path, "prompt": list(range(1000, 1016)), "max_tokens": 1}
    result: dict = {}
    try:
        while time.perf_counter() - start < 300:
            if proc.poll() is not None:
                result["error"] = f"server exited with {proc.returncode}"
                break
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
            except httpx.TransportError:
                time.sleep(0.2)
                continue
            result = {
                "status": r.status_code,
                "first_token_s": round(time.perf_counter() - start, 1),
            }
            if traffic:
                url = f"http://127.0.0.1:{port}/v1/completions"
                result["traffic_status"] = serving_traffic(url, path)
            break
    finally:
        proc.terminate()
        log = proc.communicate(timeout=60)[0].decode(errors="replace")
    result["log"] = [line for line in log.splitlines() if "INFO" in line and "HTTP" not in line]
    return result


def _cache_inventory(path: str) -> dict:
    """Entries, files by suffix and bytes of a Triton cache directory."""
    suffixes: dict[str, list[int]] = {}
    entries = 0
    for root, _dirs, files in os.walk(path):
        entries += root != path
        for name in files:
            suffix = name.rsplit(".", 1)[-1] if "." in name else name
            count_bytes = suffixes.setdefault(suffix, [0, 0])
            count_bytes[0] += 1
            count_bytes[1] += os.path.getsize(os.path.join(root, name))
    return {"entries": entries, "files_by_suffix": suffixes}


def _environment() -> dict:
    import torch
    import triton

    torch_dir = os.path.dirname(torch.__file__)
    return {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": sys.version.split()[0],
        "torch_dir_writable": os.access(torch_dir, os.W_OK),
        "torch_has_bytecode": os.path.isdir(os.path.join(torch_dir, "__pycache__")),
    }


def fill_cache(shapes: list[str], save_to: str) -> None:
    from benchmarks.gpu_shapes import write_shape_json

    os.environ.update(TRITON_CACHE_DIR=save_to, LMSERVE_SHIPPED_KERNELS="0")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            run = cold_start(write_shape_json(tmp, shape), traffic=True)
            statuses = sorted(set(run.get("traffic_status", [])))
            print(shape, run.get("status"), statuses, run.get("first_token_s"), run.get("error"))
    print("cache", json.dumps(_cache_inventory(save_to)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="empty,warm")
    parser.add_argument("--save-cache", default=None)
    parser.add_argument(
        "--build-shapes",
        default=None,
        help="instead of timing: fill one empty Triton cache by starting each of these shapes "
        "(e.g. 8b,0.5b) and sending TRAFFIC_WAVES, then copy it to --save-cache",
    )
    parser.add_argument("--out", default="cold_start.json")
    args = parser.parse_args()
    from benchmarks.gpu_shapes import write_shape_json

    # Nothing here imports torch or transformers before the first run: on a fresh machine
    # that run is the first to read them from disk.
    result: dict = {"benchmark": "cold_start", "runs": []}
    if args.build_shapes:
        return fill_cache(args.build_shapes.split(","), args.save_cache)
    with tempfile.TemporaryDirectory() as tmp:
        model = write_shape_json(tmp, "8b")
        cache_dir = None
        for label in args.runs.split(","):
            if label != "warm" or cache_dir is None:
                cache_dir = tempfile.mkdtemp(prefix=f"triton-{label}-", dir=tmp)
            os.environ["TRITON_CACHE_DIR"] = cache_dir
            os.environ["LMSERVE_SHIPPED_KERNELS"] = "0" if label == "empty" else "1"
            start = time.perf_counter()
            run = cold_start(model)
            run.update(label=label, wall_s=round(time.perf_counter() - start, 1))
            run["triton_cache"] = _cache_inventory(cache_dir)
            result["runs"].append(run)
            print(label, json.dumps(run), flush=True)
            if args.save_cache and not os.path.exists(args.save_cache):
                shutil.copytree(cache_dir, args.save_cache)
    result.update(_environment())
    print(f"{'run':<10}{'first token s':>15}{'cache entries':>15}")
    for run in result["runs"]:
        entries = run["triton_cache"]["entries"]
        print(f"{run['label']:<10}{run.get('first_token_s', 'error'):>15}{entries:>15}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
