"""Triton kernels compiled ahead of time and shipped with the package.

On a machine that has never run lmserve, Triton compiles every kernel specialisation the first
start-up needs (attention, GEMV, fused norms, samplers; several seconds of LLVM and ptxas) while
the memory profile and the CUDA-graph capture wait for them. A *bundle* holds those compiled
kernels for one Triton version and one GPU target, as Triton's own cache entries (the metadata
JSON and the cubin of each). Before the first kernel compiles, `install_shipped_kernels` copies
the bundle for the running Triton and GPU into Triton's cache directory; Triton then finds each
kernel there under the key it computes itself — a key over the kernel's source, its
specialisation, Triton's version and the target — so an entry is only ever used for exactly the
kernel it was compiled from, and a kernel edited since the bundle was built simply compiles as
before. `LMSERVE_SHIPPED_KERNELS=0` turns this off.

Building a bundle (on the GPU the bundle is for, after a start-up filled an empty cache):

    TRITON_CACHE_DIR=/tmp/tc LMSERVE_SHIPPED_KERNELS=0 lmserve serve MODEL ...   # one request, stop
    python -m lmserve.kernel_cache build /tmp/tc

`benchmarks/cold_start.py --save-cache DIR` does the first step. `tests/test_kernel_cache.py`
checks that every shipped bundle was built from the kernel sources in this tree.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import io
import json
import logging
import os
import tarfile
import tempfile
import time
from pathlib import Path

from lmserve import envs

logger = logging.getLogger(__name__)

BUNDLE_DIR = Path(__file__).parent / "bundles"
# Every module of lmserve that defines @triton.jit kernels (a test keeps this list complete).
KERNEL_MODULES = (
    "lmserve.attention.shared_prefix",
    "lmserve.attention.triton_backend",
    "lmserve.model.layers.fused_ops",
    "lmserve.model.layers.gemv",
    "lmserve.sample.triton_argmax",
    "lmserve.sample.triton_race",
)
# Of a cache entry, what Triton needs to load a kernel: its metadata and its binary.
_KEPT_SUFFIXES = (".json", ".cubin")


def bundle_name(triton_version: str, capability: tuple[int, int]) -> str:
    return f"triton-{triton_version}-cuda-{capability[0]}{capability[1]}.tar.gz"


def kernel_sources() -> dict[str, str]:
    """sha256 of the source of every lmserve Triton kernel, by module and function name. Read
    from the files (kernels are defined inside the functions that first need them, so that
    importing lmserve does not import Triton)."""
    hashes = {}
    for module_name in KERNEL_MODULES:
        path = Path(importlib.util.find_spec(module_name).origin)
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and any(map(_is_triton_jit, node.decorator_list)):
                text = ast.get_source_segment(source, node, padded=False) or ""
                hashes[f"{module_name}.{node.name}"] = hashlib.sha256(text.encode()).hexdigest()
    return hashes


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target) == "triton.jit"


# ---- install (every start-up on CUDA) ---------------------------------------------------------


def triton_cache_dir() -> Path:
    """The directory Triton's file cache uses (TRITON_CACHE_DIR, else ~/.triton/cache)."""
    import triton

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return Path(knobs.cache.dir)
    home = os.environ.get("TRITON_HOME", os.path.expanduser("~"))
    return Path(os.environ.get("TRITON_CACHE_DIR") or os.path.join(home, ".triton", "cache"))


def install_shipped_kernels(capability: tuple[int, int]) -> int:
    """Copy the shipped bundle for this Triton and GPU into Triton's cache, skipping entries
    already there. Returns the number of entries copied (0 when there is no bundle, it was
    installed before, or LMSERVE_SHIPPED_KERNELS=0). Never raises: a failure only costs the
    compile time the bundle would have saved."""
    if not envs.LMSERVE_SHIPPED_KERNELS:
        return 0
    try:
        import triton
    except ImportError:
        return 0
    bundle = BUNDLE_DIR / bundle_name(triton.__version__, capability)
    if not bundle.is_file():
        return 0
    try:
        return _install(bundle, triton_cache_dir())
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:  # unreadable or corrupt
        logger.warning("shipped Triton kernels not installed (%s); they compile instead", e)
        return 0


def _install(bundle: Path, cache_dir: Path) -> int:
    start = time.perf_counter()
    data = bundle.read_bytes()
    marker = cache_dir / f"lmserve-{hashlib.sha256(data).hexdigest()[:16]}.installed"
    if marker.exists():
        return 0
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries = _read_bundle(data)
    copied = sum(_install_entry(cache_dir, key, files) for key, files in entries.items())
    marker.touch()
    logger.info(
        "installed %d of %d shipped Triton kernels into %s in %.3f s",
        copied,
        len(entries),
        cache_dir,
        time.perf_counter() - start,
    )
    return copied


def _read_bundle(data: bytes) -> dict[str, dict[str, bytes]]:
    """{cache key: {file name: bytes}} of a bundle; members are `entries/<key>/<file>`."""
    entries: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] != "entries":
                continue
            _, key, name = parts
            if not _safe_name(key) or not _safe_name(name):
                raise OSError(f"bad member name in kernel bundle: {member.name!r}")
            entries.setdefault(key, {})[name] = tar.extractfile(member).read()
    return entries


def _safe_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name


def _install_entry(cache_dir: Path, key: str, files: dict[str, bytes]) -> bool:
    """Write one cache entry: its files, then Triton's group file listing them at their new
    absolute paths. Written beside the cache and renamed in, so a concurrent reader (another
    tensor-parallel worker) sees the whole entry or none of it."""
    target = cache_dir / key
    if target.exists():
        return False
    staging = Path(tempfile.mkdtemp(prefix=f"lmserve-{key}-", dir=cache_dir))
    for name, content in files.items():
        (staging / name).write_bytes(content)
    metadata = [name for name in files if name.endswith(".json")]
    for name in metadata:
        children = {child: str(target / child) for child in files}
        (staging / f"__grp__{name}").write_text(json.dumps({"child_paths": children}))
    try:
        staging.rename(target)
    except OSError:  # another process installed it first
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
        return False
    return True


# ---- build (once per Triton version and GPU, on that GPU) -------------------------------------


def build_bundle(cache_dir: Path, out_dir: Path, capability: tuple[int, int]) -> Path:
    """A bundle of the lmserve kernels in a Triton cache directory filled by a start-up."""
    import triton

    names = {qualified.rsplit(".", 1)[1] for qualified in kernel_sources()}
    buffer = io.BytesIO()
    kept = 0
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in sorted(p for p in cache_dir.iterdir() if p.is_dir()):
            files = _kernel_files(entry, names)
            for path in files:
                _add_bytes(tar, f"entries/{entry.name}/{path.name}", path.read_bytes())
            kept += bool(files)
        manifest = {
            "triton": triton.__version__,
            "capability": list(capability),
            "entries": kept,
            "kernel_sources": kernel_sources(),
        }
        _add_bytes(tar, "manifest.json", json.dumps(manifest, indent=1).encode())
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / bundle_name(triton.__version__, capability)
    out.write_bytes(buffer.getvalue())
    return out


def _kernel_files(entry: Path, kernel_names: set[str]) -> list[Path]:
    """The metadata JSON and binary of a cache entry that holds an lmserve kernel, else []."""
    for meta in entry.glob("*.json"):
        if meta.name.startswith("__grp__"):
            continue
        try:
            name = json.loads(meta.read_text()).get("name")
        except (OSError, ValueError):
            return []
        if name in kernel_names:
            kept = [p for p in entry.iterdir() if p.suffix in _KEPT_SUFFIXES]
            return sorted(p for p in kept if not p.name.startswith("__grp__"))
    return []


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def read_manifest(bundle: Path) -> dict:
    with tarfile.open(bundle, mode="r:gz") as tar:
        return json.loads(tar.extractfile("manifest.json").read())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lmserve.kernel_cache")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="bundle the lmserve kernels of a filled Triton cache")
    build.add_argument("cache_dir", type=Path)
    build.add_argument("--out", type=Path, default=BUNDLE_DIR)
    build.add_argument(
        "--capability",
        default=None,
        help="GPU compute capability as MAJOR.MINOR (default: the current GPU's)",
    )
    args = parser.parse_args(argv)
    if args.capability:
        parts = args.capability.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            parser.error(f"--capability {args.capability!r}: expected MAJOR.MINOR, e.g. 9.0")
        capability = (int(parts[0]), int(parts[1]))
    else:
        import torch

        capability = torch.cuda.get_device_capability()
    out = build_bundle(args.cache_dir, args.out, capability)
    manifest = read_manifest(out)
    print(f"{out}: {manifest['entries']} kernels, {out.stat().st_size / 1024:.0f} KiB")
