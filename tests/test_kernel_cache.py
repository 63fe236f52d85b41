"""The shipped Triton kernel cache: a bundle built from a filled Triton cache installs entries
that Triton's own cache manager reads back, only lmserve's kernels go in, installing twice or
with LMSERVE_SHIPPED_KERNELS=0 does nothing, and every shipped bundle matches this tree's
kernel sources."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

from lmserve import kernel_cache  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _fake_triton_entry(cache: Path, key: str, kernel: str) -> None:
    """A cache entry as Triton writes one: IR files, binary, metadata, and a group file that
    lists them at absolute paths."""
    entry = cache / key
    entry.mkdir(parents=True)
    files = {
        f"{kernel}.ttir": b"ir",
        f"{kernel}.ptx": b"ptx",
        f"{kernel}.cubin": b"\x7fELF cubin of " + kernel.encode(),
        f"{kernel}.json": json.dumps({"name": kernel, "hash": key}).encode(),
    }
    for name, content in files.items():
        (entry / name).write_bytes(content)
    group = {name: str(entry / name) for name in files}
    (entry / f"__grp__{kernel}.json").write_text(json.dumps({"child_paths": group}))


@pytest.fixture
def lmserve_kernel() -> str:
    return next(iter(kernel_cache.kernel_sources())).rsplit(".", 1)[1]


@pytest.fixture
def bundle(tmp_path, lmserve_kernel) -> Path:
    filled = tmp_path / "filled"
    _fake_triton_entry(filled, "KEYOURS", lmserve_kernel)
    _fake_triton_entry(filled, "KEYFOREIGN", "someone_elses_kernel")
    (filled / "KEYSO").mkdir()
    (filled / "KEYSO" / "cuda_utils.so").write_bytes(b"so")
    return kernel_cache.build_bundle(filled, tmp_path / "bundles", (9, 0))


def test_every_module_with_triton_kernels_is_listed():
    out = subprocess.run(
        ["grep", "-rlE", "^ *@triton.jit", "lmserve"], cwd=REPO, capture_output=True, text=True
    ).stdout
    modules = {p.removesuffix(".py").replace("/", ".") for p in out.split()}
    assert modules == set(kernel_cache.KERNEL_MODULES)


def test_a_bundle_keeps_only_lmserve_kernels_metadata_and_binary(bundle, lmserve_kernel):
    assert bundle.name == f"triton-{__import__('triton').__version__}-cuda-90.tar.gz"
    with tarfile.open(bundle) as tar:
        names = sorted(tar.getnames())
    assert names == [
        f"entries/KEYOURS/{lmserve_kernel}.cubin",
        f"entries/KEYOURS/{lmserve_kernel}.json",
        "manifest.json",
    ]
    manifest = kernel_cache.read_manifest(bundle)
    assert manifest["entries"] == 1 and manifest["capability"] == [9, 0]
    assert manifest["kernel_sources"] == kernel_cache.kernel_sources()


def test_installed_entries_are_read_back_by_tritons_cache_manager(
    bundle, lmserve_kernel, tmp_path, monkeypatch
):
    from triton.runtime.cache import FileCacheManager

    cache = tmp_path / "fresh-cache"
    assert kernel_cache._install(bundle, cache) == 1
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    group = FileCacheManager("KEYOURS").get_group(f"{lmserve_kernel}.json")
    assert set(group) == {f"{lmserve_kernel}.json", f"{lmserve_kernel}.cubin"}
    assert all(Path(p).parent == cache / "KEYOURS" for p in group.values())
    assert Path(group[f"{lmserve_kernel}.cubin"]).read_bytes().startswith(b"\x7fELF")
    assert not (cache / "KEYFOREIGN").exists()
    assert [p.name for p in cache.iterdir() if p.name.startswith("lmserve-")] != []


def test_install_skips_entries_present_and_bundles_installed_before(bundle, tmp_path):
    cache = tmp_path / "cache"
    (cache / "KEYOURS").mkdir(parents=True)
    (cache / "KEYOURS" / "mine").write_text("kept")
    assert kernel_cache._install(bundle, cache) == 0
    assert (cache / "KEYOURS" / "mine").read_text() == "kept"
    assert sorted(p.name for p in (cache / "KEYOURS").iterdir()) == ["mine"]
    # Installed once (marker written): the next start-up does not even read the entries.
    assert kernel_cache._install(bundle, cache) == 0
    assert not any(p.name.startswith("lmserve-KEY") for p in cache.iterdir())  # no staging left


def test_install_follows_the_environment_and_the_running_triton(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_cache, "BUNDLE_DIR", bundle.parent)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "tc"))
    assert kernel_cache.install_shipped_kernels((8, 0)) == 0  # no bundle for this GPU
    monkeypatch.setenv("LMSERVE_SHIPPED_KERNELS", "0")
    assert kernel_cache.install_shipped_kernels((9, 0)) == 0
    assert not (tmp_path / "tc" / "KEYOURS").exists()
    monkeypatch.setenv("LMSERVE_SHIPPED_KERNELS", "1")
    assert kernel_cache.install_shipped_kernels((9, 0)) == 1
    assert (tmp_path / "tc" / "KEYOURS").is_dir()


def test_a_bundle_with_a_path_outside_its_entry_is_refused(tmp_path, monkeypatch, caplog):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        kernel_cache._add_bytes(tar, "entries/../escape", b"x")
    bad = tmp_path / kernel_cache.bundle_name(__import__("triton").__version__, (9, 0))
    bad.write_bytes(buffer.getvalue())
    monkeypatch.setattr(kernel_cache, "BUNDLE_DIR", tmp_path)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "tc"))
    assert kernel_cache.install_shipped_kernels((9, 0)) == 0
    assert "not installed" in caplog.text
    assert not (tmp_path / "escape").exists()


def test_a_corrupt_bundle_costs_only_the_compile_time(tmp_path, monkeypatch, caplog):
    bad = tmp_path / kernel_cache.bundle_name(__import__("triton").__version__, (9, 0))
    bad.write_bytes(b"\x1f\x8b not really gzip")
    monkeypatch.setattr(kernel_cache, "BUNDLE_DIR", tmp_path)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "tc"))
    assert kernel_cache.install_shipped_kernels((9, 0)) == 0
    assert "not installed" in caplog.text


def test_shipped_bundles_were_built_from_these_kernel_sources():
    """A kernel edited since its bundle was built would compile again at start-up (Triton's key
    covers the source, so the stale entry is never used): rebuild the bundle on the GPU."""
    bundles = sorted(kernel_cache.BUNDLE_DIR.glob("*.tar.gz"))
    assert bundles, "no kernel bundle shipped"
    current = kernel_cache.kernel_sources()
    for path in bundles:
        shipped = kernel_cache.read_manifest(path)["kernel_sources"]
        stale = sorted(name for name in current if shipped.get(name) != current[name])
        assert not stale, f"{path.name} predates edits to {stale}: rebuild it"
