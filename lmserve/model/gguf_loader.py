"""Serve a GGUF file (llama.cpp's format) by converting it, once, into an ordinary HF folder.

    folder = cached_gguf_folder("SmolLM2-135M-Instruct.Q4_1.gguf")  # converts on first use
    AutoConfig.from_pretrained(folder); AutoTokenizer.from_pretrained(folder)  # plain HF from here

The converted folder holds config.json, generation_config.json, model.safetensors (float32: the
exact dequantized values, so float32 parity with HF's own GGUF loader holds; shards of <= 2 GiB
plus an index for large models), the tokenizer files with the chat template, and
gguf_source.json (written last; it marks the folder complete). It lives
in `<LMSERVE_CACHE_DIR>/gguf/<stem>-<key>/`, where the key hashes the source file's real path,
size and mtime and the converter version, so later starts only stat the file.

Cache layout and its guarantees:

    <cache>/gguf/
        SmolLM2-135M-Instruct.Q4_1-3f9c0a1b2c3d4e5f/      complete: renamed into place last
        .SmolLM2-135M-Instruct.Q4_1-3f9c0a1b2c3d4e5f.lock  serialises concurrent conversions
        .tmp-SmolLM2-...-<pid>-<random>/                   a conversion in progress (or crashed)

A conversion writes into a temporary folder and renames it into place, so a crash never leaves a
half folder under the final name; temporary folders are never read, and stale ones are removed.
Concurrent starts take an advisory file lock (POSIX), so one converts and the others wait; without
the lock the rename still keeps the folder whole (the loser discards its copy).

Only the Llama architecture (general.architecture == "llama") is converted; anything else raises.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from lmserve.gguf_tokenizer import gguf_field, save_gguf_tokenizer

logger = logging.getLogger(__name__)

# Bump when the converted folder's contents change: older conversions are then ignored.
CONVERTER_VERSION = 3
GGUF_CACHE_SUBDIR = "gguf"
COMPLETE_MARKER = "gguf_source.json"
# The 4-bit tensors' own codes, for weights kept packed on the CPU (lmserve/model/quantize.py);
# in a subfolder, so loaders that glob *.safetensors never take it for model weights.
INT4_CODES_FILE = os.path.join("packed", "int4.safetensors")
# Converted weights go into safetensors files of at most this size (float32: 4 bytes a value),
# so converting a large GGUF never holds all its dequantized weights in memory at once.
MAX_SHARD_BYTES = 2 * 2**30
# Leftover temporary folders older than this are removed (a conversion takes seconds).
_STALE_TMP_SECONDS = 3600
# Storage types we dequantize (all through `gguf.quants.dequantize`, numpy only).
SUPPORTED_TENSOR_TYPES = frozenset(
    ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
)  # fmt: skip
# llama.cpp tensor name (after "blk.N.") -> HF name (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def is_gguf_file(model: str) -> bool:
    return model.lower().endswith(".gguf")


# ---------------------------------------------------------------------------------------------
# The cache


def cached_gguf_folder(gguf_path: str, cache_dir: str | None = None) -> str:
    """The converted HF folder for `gguf_path`, converting it on first use.

    cache_dir defaults to `<LMSERVE_CACHE_DIR>/gguf`. Safe to call from several processes at
    once: exactly one complete folder ends up under the final name.
    """
    gguf_path = os.path.realpath(os.path.expanduser(gguf_path))
    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"GGUF file {gguf_path!r} does not exist")
    cache_dir = cache_dir or _default_cache_dir()
    key = gguf_cache_key(gguf_path, cache_dir)
    folder = os.path.join(cache_dir, key)
    if _is_complete(folder):
        logger.info("GGUF %s: using its converted copy in %s", gguf_path, folder)
        return folder
    os.makedirs(cache_dir, exist_ok=True)
    with _file_lock(os.path.join(cache_dir, f".{key}.lock")):
        if _is_complete(folder):  # another process converted it while we waited
            logger.info("GGUF %s: converted by another process into %s", gguf_path, folder)
            return folder
        _remove_stale_tmp_dirs(cache_dir, key)
        tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-{os.getpid()}-", dir=cache_dir)
        try:
            convert_gguf_to_hf(gguf_path, tmp)
            _make_readable(tmp)
            _publish(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    return folder


def gguf_cache_key(gguf_path: str, cache_dir: str | None = None) -> str:
    """`<file stem>-<16 hex digits>`: a hash of the file's bytes and the converter version.

    Content, not path: the same GGUF installed into a second virtual environment (a new path, a
    new mtime) reuses the first conversion instead of writing another full-precision copy. The
    digest is remembered per real path (with its size and mtime) under `<cache_dir>/.digests`,
    so a start after the first costs one stat; a file replaced or edited in place is hashed
    again.
    """
    path = os.path.realpath(gguf_path)
    stem = os.path.basename(path)[: -len(".gguf")] if is_gguf_file(path) else os.path.basename(path)
    ident = f"{CONVERTER_VERSION}\0{_content_digest(path, cache_dir)}"
    return f"{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def _content_digest(path: str, cache_dir: str | None) -> str:
    """sha256 of the file, memoised in `<cache_dir>/.digests/<hash of path>` as one line:
    "<size> <mtime_ns> <sha256> <path>". One memo per path: a file replaced or edited in place
    overwrites its memo, and memos of paths that no longer exist (an uninstalled environment)
    are removed whenever a file is hashed."""
    cache_dir = cache_dir or _default_cache_dir()
    st = os.stat(path)
    folder = os.path.join(cache_dir, ".digests")
    memo = os.path.join(folder, hashlib.sha256(path.encode()).hexdigest()[:32])
    stamp = f"{st.st_size} {st.st_mtime_ns} "
    with contextlib.suppress(OSError, ValueError):  # missing, unreadable or not text: hash
        with open(memo) as f:
            line = f.read()
        if line.startswith(stamp):  # the same file: its size and mtime, then the digest
            digest = line.split(" ", 3)[2]
            if len(digest) == 64:
                return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache just hashes again next time
        os.makedirs(folder, exist_ok=True)
        tmp = f"{memo}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{stamp}{digest} {path}")
        os.replace(tmp, memo)
        _prune_digests(folder)
    return digest


def _prune_digests(folder: str) -> None:
    """Remove the memos of files that no longer exist, and unreadable or old-format ones."""
    for name in os.listdir(folder):
        memo = os.path.join(folder, name)
        with contextlib.suppress(OSError, ValueError):
            if name.endswith(".tmp"):
                continue  # another process's memo being written
            with open(memo) as f:
                fields = f.read().split(" ", 3)
            if len(fields) != 4 or not os.path.exists(fields[3]):
                os.remove(memo)


def _default_cache_dir() -> str:
    from lmserve import envs

    return os.path.join(envs.LMSERVE_CACHE_DIR, GGUF_CACHE_SUBDIR)


def _is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def _publish(tmp: str, folder: str) -> None:
    """Move the finished `tmp` folder to `folder`. A folder already there without the completion
    marker (copied by hand, damaged) is moved aside first; one with the marker wins."""
    if os.path.lexists(folder) and not _is_complete(folder):
        broken = f"{tmp}-broken"
        os.rename(folder, broken)
        shutil.rmtree(broken, ignore_errors=True)
        logger.warning("removed the incomplete converted folder %s", folder)
    try:
        os.rename(tmp, folder)
    except OSError:
        if not _is_complete(folder):  # someone else's complete folder is fine; anything else not
            raise


def _make_readable(folder: str) -> None:
    """rwxr-xr-x / rw-r--r--: mkdtemp and safetensors create owner-only folders and files, and a
    shared cache should be readable by everyone who can read the GGUF."""
    os.chmod(folder, 0o755)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)


def _remove_stale_tmp_dirs(cache_dir: str, key: str) -> None:
    now = time.time()
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name.startswith(f".tmp-{key}-") and os.path.isdir(path):
            with contextlib.suppress(OSError):
                if now - os.path.getmtime(path) > _STALE_TMP_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock on `path` (POSIX flock); a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on the atomic rename alone
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# The conversion


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    """Write the HF folder for `gguf_path` into the existing folder `out_dir`: config.json,
    generation_config.json, model.safetensors, tokenizer files, then gguf_source.json."""
    from gguf import GGUFReader

    start = time.perf_counter()
    reader = GGUFReader(gguf_path)
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    logger.info(
        "converting GGUF %s (%d tensors: %s) into an HF folder; this happens once",
        gguf_path, len(reader.tensors), ", ".join(f"{n} {t}" for t, n in tensor_types.most_common()),
    )  # fmt: skip
    for tensor in reader.tensors:  # fail before any slow work
        if tensor.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, which lmserve "
                f"cannot dequantize (supported: {sorted(SUPPORTED_TENSOR_TYPES)})"
            )
    config = gguf_to_hf_config(reader)
    config.save_pretrained(out_dir)
    _generation_config(config).save_pretrained(out_dir)
    num_params = save_sharded_safetensors(iterate_hf_weights(reader, config), out_dir)
    save_int4_codes(reader, config, out_dir)
    weights_s = time.perf_counter() - start
    save_gguf_tokenizer(gguf_path, reader, out_dir)
    elapsed = time.perf_counter() - start
    with open(os.path.join(out_dir, COMPLETE_MARKER), "w") as f:
        st = os.stat(gguf_path)
        json.dump(
            {
                "source": gguf_path,
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "converter_version": CONVERTER_VERSION,
                "tensor_types": dict(tensor_types),
                "seconds": round(elapsed, 2),
            },
            f,
            indent=2,
        )
    logger.info(
        "converted %s in %.1f s (weights %.1f s, tokenizer %.1f s): %d params as float32",
        os.path.basename(gguf_path), elapsed, weights_s, elapsed - weights_s, num_params,
    )  # fmt: skip


def save_sharded_safetensors(weights: Iterator[tuple[str, np.ndarray]], out_dir: str) -> int:
    """Write `weights` as model.safetensors, or, past MAX_SHARD_BYTES, as shards
    model-0000i-of-0000n.safetensors plus model.safetensors.index.json (HF's layout), holding at
    most one shard in memory. Returns the number of values written."""
    from safetensors.numpy import save_file

    shard_names: list[str] = []
    weight_map: dict[str, str] = {}
    shard: dict[str, np.ndarray] = {}
    shard_bytes = total_bytes = num_values = 0

    def flush() -> None:
        name = f"shard-{len(shard_names):05d}.safetensors"  # renamed once the count is known
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        shard_names.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard.clear()

    for name, weight in weights:
        if shard and shard_bytes + weight.nbytes > MAX_SHARD_BYTES:
            flush()
            shard_bytes = 0
        shard[name] = weight
        shard_bytes += weight.nbytes
        total_bytes += weight.nbytes
        num_values += weight.size
    flush()
    if len(shard_names) == 1:
        os.rename(os.path.join(out_dir, shard_names[0]), os.path.join(out_dir, "model.safetensors"))
        return num_values
    final = {
        old: f"model-{i + 1:05d}-of-{len(shard_names):05d}.safetensors"
        for i, old in enumerate(shard_names)
    }
    for old, new in final.items():
        os.rename(os.path.join(out_dir, old), os.path.join(out_dir, new))
    index = {
        "metadata": {"total_size": total_bytes},
        "weight_map": {name: final[old] for name, old in weight_map.items()},
    }
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return num_values


def gguf_to_hf_config(reader) -> Any:
    """A transformers LlamaConfig from the GGUF metadata (llama.cpp's key names)."""
    from transformers import LlamaConfig

    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (lmserve converts 'llama' GGUF files)"
        )

    def meta(key: str, default: Any = None) -> Any:
        value = gguf_field(reader, f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    tensor_names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF has per-frequency rope factors (rope_freqs.weight): not supported")
    hidden_size = int(meta("embedding_length"))
    num_heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden_size // num_heads))
    rotary_dim = int(meta("rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise ValueError(
            f"GGUF rotary dimension {rotary_dim} != head_dim {head_dim}: not supported"
        )
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab_size = gguf_field(reader, f"{arch}.vocab_size") or int(embedding.shape[-1])
    config = LlamaConfig(
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=int(meta("block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(meta("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        max_position_embeddings=int(meta("context_length")),
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_parameters=_rope_parameters(reader, arch),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        mlp_bias="blk.0.ffn_up.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=gguf_field(reader, "tokenizer.ggml.padding_token_id"),
        dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def _rope_parameters(reader, arch: str) -> dict[str, Any]:
    theta = float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0))
    scaling = gguf_field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        factor = float(gguf_field(reader, f"{arch}.rope.scaling.factor", 1.0))
        return {"rope_type": "linear", "factor": factor, "rope_theta": theta}
    raise ValueError(f"GGUF rope scaling {scaling!r} is not supported (only linear)")


def _generation_config(config: Any) -> Any:
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )


def iterate_hf_weights(reader, config: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every GGUF tensor, dequantized, with attn_q / attn_k rows
    put back in HF's order. Raises on an unknown tensor or a shape the config does not expect."""
    expected = _expected_shapes(config)
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        weight = dequantize_tensor(tensor)
        if ".attn_q." in tensor.name:
            weight = unpermute_rotary_rows(weight, config.num_attention_heads)
        elif ".attn_k." in tensor.name:
            weight = unpermute_rotary_rows(weight, config.num_key_value_heads)
        # "model.layers.3.self_attn.q_proj.weight" -> "self_attn.q_proj"
        key = name.split(".", 3)[3].rpartition(".")[0] if name.startswith("model.layers.") else name
        want = expected.get(key)
        if name.endswith(".weight") and weight.shape != want:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has shape {weight.shape}, expected {want} from "
                "the metadata"
            )
        yield name, weight


def _expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Weight shapes keyed by HF name (global) or by the part after "model.layers.N." (layers)."""
    h, i, d = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "lm_head.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
        "input_layernorm": (h,),
        "post_attention_layernorm": (h,),
        "self_attn.q_proj": (q, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def hf_tensor_name(gguf_name: str) -> str:
    """The HF name of a llama.cpp tensor; raises if it has none.

    "blk.3.attn_q.weight" -> "model.layers.3.self_attn.q_proj.weight"
    """
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if suffix in ("weight", "bias"):
        if len(parts) == 1 and parts[0] in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[parts[0]]}.{suffix}"
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
            hf_name = _LAYER_TENSORS.get(parts[2])
            if hf_name is not None:
                return f"model.layers.{parts[1]}.{hf_name}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def dequantize_tensor(tensor) -> np.ndarray:
    """A GGUF reader tensor as a float32 array in numpy (HF) order: [rows, cols] = [out, in]."""
    from gguf.quants import dequantize

    type_name = tensor.tensor_type.name
    if type_name not in SUPPORTED_TENSOR_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name!r}: storage type {type_name} is not supported")
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:  # an older gguf package without this type
        raise ValueError(f"GGUF tensor {tensor.name!r}: cannot dequantize {type_name}") from e
    return np.ascontiguousarray(values, dtype=np.float32)


# Types whose values are exactly (code - 8) * scale + zero with 4-bit codes in groups of 32.
INT4_TENSOR_TYPES = frozenset(("Q4_0", "Q4_1", "Q4_K"))


def gguf_int4_codes(tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0 / Q4_1 / Q4_K tensor's codes [N, K] uint8 (0..15), scales and zeros [N, K / 32]
    float32, such that (code - 8) * scale + zero is exactly what `dequantize_tensor` gives:

        Q4_0   d * (q - 8)                 scale = d,       zero = 0
        Q4_1   d * q + m                   scale = d,       zero = m + 8 d
        Q4_K   (d sc) * q - (dmin mn)      scale = d sc,    zero = 8 d sc - dmin mn   (per 32)
    """
    from gguf.quants import Q4_K

    type_name = tensor.tensor_type.name
    if type_name not in INT4_TENSOR_TYPES:
        raise ValueError(f"GGUF tensor {tensor.name!r}: {type_name} is not a 4-bit group type")
    rows = int(tensor.data.shape[0])
    data = np.ascontiguousarray(tensor.data).reshape(rows, -1)  # [N, bytes per row]
    if type_name == "Q4_K":
        blocks = data.reshape(-1, 144)  # per 256 values: d, dmin, 12 bytes of scales, 128 of qs
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = Q4_K.get_scale_min(blocks[:, 4:16])  # [B, 8] each
        scales = d * sc.astype(np.float32)  # [B, 8]: one per 32 values
        zeros = 8 * scales - dmin * mn.astype(np.float32)
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)  # 4 x 32 bytes: low nibbles, then high
        codes = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    else:
        has_min = type_name == "Q4_1"
        blocks = data.reshape(-1, 20 if has_min else 18)  # per 32 values
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # [B, 1]
        if has_min:
            m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
            scales, zeros = d, m + 8 * d
        else:
            scales, zeros = d, np.zeros_like(d)
        qs = blocks[:, -16:].reshape(-1, 1, 16)  # element j: low nibble, j + 16: high nibble
        codes = (qs >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & np.uint8(0x0F)
    return codes.reshape(rows, -1), scales.reshape(rows, -1), zeros.reshape(rows, -1)


def iterate_int4_codes(reader, config: Any) -> Iterator[tuple[str, tuple]]:
    """(HF name, (codes, scales, zeros)) for every 4-bit tensor of a GGUF file, attn_q / attn_k
    rows put back in HF's order (the same row permutation as the float weights)."""
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in INT4_TENSOR_TYPES:
            continue
        parts = gguf_int4_codes(tensor)
        if ".attn_q." in tensor.name:
            parts = tuple(unpermute_rotary_rows(a, config.num_attention_heads) for a in parts)
        elif ".attn_k." in tensor.name:
            parts = tuple(unpermute_rotary_rows(a, config.num_key_value_heads) for a in parts)
        yield hf_tensor_name(tensor.name), parts


def save_int4_codes(reader, config: Any, out_dir: str) -> int:
    """Write the 4-bit tensors' codes (two per byte), scales and zeros into INT4_CODES_FILE of
    the converted folder, so packing them at start reads one file instead of parsing the GGUF
    again (~3 s for the default model's vocabulary metadata). Returns the tensors written."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for name, (codes, scales, zeros) in iterate_int4_codes(reader, config):
        tensors[f"{name}.codes"] = codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))  # [N, K/2]
        tensors[f"{name}.scales"], tensors[f"{name}.zeros"] = scales, zeros
    if tensors:
        path = os.path.join(out_dir, INT4_CODES_FILE)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(tensors, path)
    return len(tensors) // 3


def load_int4_codes(folder: str) -> list[tuple[str, tuple]]:
    """What `save_int4_codes` wrote: (HF name, (codes [N, K] uint8, scales, zeros [N, K/32]));
    empty when the folder has none (not converted from a GGUF, or no 4-bit tensors)."""
    from safetensors import safe_open

    path = os.path.join(folder, INT4_CODES_FILE)
    if not os.path.isfile(path):
        return []
    out = []
    with safe_open(path, framework="np") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            if not key.endswith(".codes"):
                continue
            name = key[: -len(".codes")]
            packed = f.get_tensor(key)  # [N, K/2]
            codes = np.stack([packed & np.uint8(0x0F), packed >> np.uint8(4)], axis=-1)
            codes = codes.reshape(packed.shape[0], -1)  # [N, K]
            out.append(
                (name, (codes, f.get_tensor(f"{name}.scales"), f.get_tensor(f"{name}.zeros")))
            )
    return out


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's row order for attn_q / attn_k.

    HF's rotary embedding pairs dimension j with j + head_dim/2 (rotate_half); llama.cpp pairs
    2j with 2j+1, so its converter interleaves each head's two halves. Within each head:

        GGUF rows:  a0 b0 a1 b1 a2 b2 ...      (a = first half, b = second half in HF)
        HF rows:    a0 a1 a2 ... b0 b1 b2 ...

    weight: [num_heads * head_dim, ...] (a weight or a bias)
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return (
        weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def permute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of `unpermute_rotary_rows`: HF rows -> llama.cpp's interleaved order."""
    half = weight.shape[0] // num_heads // 2
    return (
        weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )
