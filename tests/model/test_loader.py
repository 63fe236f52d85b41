"""Weight loading: single and sharded safetensors, dummy weights, dtypes, and the errors a user
sees for unsupported models, incomplete checkpoints and unreachable model ids."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from lmserve.model import MODEL_REGISTRY, get_kv_cache_spec, load_model, resolve_model_path
from lmserve.model.models.llama import LlamaForCausalLM
from tests.tiny_models import PagedKVHarness, tiny_hf_config

CPU = torch.device("cpu")


def hf_config_of(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def rewrite_checkpoint(src: str, dst: str, edit) -> str:
    """Copy the tiny model folder `src` to `dst` with its tensors passed through `edit(dict)`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = edit(load_file(os.path.join(dst, "model.safetensors")))
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_sharded_checkpoint_loads_the_same_weights_as_one_file(tiny_model_dir):
    single = tiny_model_dir("qwen2")
    sharded = tiny_model_dir("qwen2", shard=True, max_shard_size="40KB")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    a = load_model(hf_config_of(single), single, torch.float32, CPU)
    b = load_model(hf_config_of(sharded), sharded, torch.float32, CPU)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_dummy_load_needs_no_checkpoint_and_is_deterministic_by_seed():
    hf_config = tiny_hf_config("qwen3")
    a = load_model(hf_config, None, torch.bfloat16, CPU, load_format="dummy", seed=7)
    b = load_model(hf_config, None, torch.bfloat16, CPU, load_format="dummy", seed=7)
    c = load_model(hf_config, None, torch.bfloat16, CPU, load_format="dummy", seed=8)
    params_a, params_b = list(a.parameters()), list(b.parameters())
    assert all(p.dtype == torch.bfloat16 and p.device == CPU for p in params_a)
    assert all(p.abs().max() <= 1e-3 for p in params_a)
    assert all(torch.equal(p, q) for p, q in zip(params_a, params_b, strict=True))
    assert not torch.equal(params_a[0], next(c.parameters()))
    logits = PagedKVHarness(hf_config, dtype=torch.bfloat16).step(a, {"r": [1, 2, 3]})["r"]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert not a.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_gives_half_params_float32_rope_and_close_logits(tiny_model_dir, dtype):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir("llama")
    hf_config = hf_config_of(path)
    model = load_model(hf_config, path, dtype, CPU)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32  # restored after the build

    prompt = list(range(4, 40))
    ours = PagedKVHarness(hf_config, dtype=dtype).step(model, {"r": prompt})["r"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float()
    # Half-precision rounding differs with kernel choice; a wrong weight would be off by O(1).
    scale = expected.abs().max().item()
    torch.testing.assert_close(ours, expected, rtol=0.0, atol=0.05 * scale)


def test_default_dtype_is_restored_when_the_build_fails():
    hf_config = tiny_hf_config("llama", hidden_act="gelu")
    with pytest.raises(NotImplementedError, match="gelu"):
        load_model(hf_config, None, torch.bfloat16, CPU, load_format="dummy")
    assert torch.get_default_dtype() == torch.float32


def test_unknown_architecture_error_names_it_and_the_supported_ones():
    hf_config = tiny_hf_config("llama")
    hf_config.architectures = ["GPTNeoXForCausalLM"]
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*LlamaForCausalLM"):
        load_model(hf_config, None, torch.float32, CPU, load_format="dummy")


def test_registry_serves_mistral_with_the_llama_implementation():
    assert MODEL_REGISTRY["MistralForCausalLM"] is LlamaForCausalLM


def test_missing_weight_error_names_the_parameter(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")

    def drop_k_proj(tensors):
        del tensors["model.layers.1.self_attn.k_proj.weight"]
        return tensors

    path = rewrite_checkpoint(src, str(tmp_path / "m"), drop_k_proj)
    with pytest.raises(ValueError, match=r"lacks weights.*model\.layers\.1\.self_attn\.qkv_proj"):
        load_model(hf_config_of(path), path, torch.float32, CPU)


def test_unexpected_checkpoint_tensor_error_names_it(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")

    def add_extra(tensors):
        tensors["model.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
        return tensors

    path = rewrite_checkpoint(src, str(tmp_path / "m"), add_extra)
    with pytest.raises(ValueError, match="extra_proj"):
        load_model(hf_config_of(path), path, torch.float32, CPU)


def test_shape_mismatch_error_names_the_checkpoint_tensor(tiny_model_dir):
    path = tiny_model_dir("llama")
    hf_config = hf_config_of(path)
    hf_config.vocab_size = 1000
    with pytest.raises(ValueError, match=r"'(lm_head|model\.embed_tokens)\.weight'.*\(512, 64\)"):
        load_model(hf_config, path, torch.float32, CPU)


def test_lm_head_in_a_tied_checkpoint_is_ignored(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama", tie_word_embeddings=True)

    def add_lm_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        return tensors

    path = rewrite_checkpoint(src, str(tmp_path / "m"), add_lm_head)
    model = load_model(hf_config_of(path), path, torch.float32, CPU)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_fused_parameter_counts_as_loaded_only_once_every_shard_arrived():
    hf_config = tiny_hf_config("llama", num_hidden_layers=1)
    model = load_model(hf_config, None, torch.float32, CPU, load_format="dummy")
    q = torch.zeros(64, 64)
    assert model.load_weights([("model.layers.0.self_attn.q_proj.weight", q)]) == set()
    k_and_v = [
        ("model.layers.0.self_attn.k_proj.weight", torch.ones(32, 64)),
        ("model.layers.0.self_attn.v_proj.weight", torch.full((32, 64), 2.0)),
    ]
    loaded = model.load_weights([("model.layers.0.self_attn.q_proj.weight", q), *k_and_v])
    assert loaded == {"model.layers.0.self_attn.qkv_proj.weight"}
    weight = model.model.layers[0].self_attn.qkv_proj.weight  # rows: [q 64 | k 32 | v 32]
    assert torch.equal(weight[:64], q)
    assert torch.equal(weight[64:96], torch.ones(32, 64))
    assert torch.equal(weight[96:], torch.full((32, 64), 2.0))


def test_folder_without_safetensors_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(tiny_hf_config("llama"), str(tmp_path), torch.float32, CPU)


def test_unsupported_dtype_and_load_format_are_rejected():
    hf_config = tiny_hf_config("llama")
    with pytest.raises(ValueError, match="dtype"):
        load_model(hf_config, None, torch.int8, CPU, load_format="dummy")
    with pytest.raises(ValueError, match="load_format"):
        load_model(hf_config, None, torch.float32, CPU, load_format="pt")


def test_unsupported_rope_type_in_config_is_a_clear_error():
    hf_config = tiny_hf_config(
        "llama", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    )
    with pytest.raises(NotImplementedError, match="'dynamic'"):
        load_model(hf_config, None, torch.float32, CPU, load_format="dummy")


def test_qwen2_sliding_window_is_not_supported():
    hf_config = tiny_hf_config("qwen2", use_sliding_window=True, max_window_layers=0)
    with pytest.raises(NotImplementedError, match="sliding"):
        load_model(hf_config, None, torch.float32, CPU, load_format="dummy")


def test_mistral_sliding_window_shorter_than_max_positions_is_not_supported():
    hf_config = tiny_hf_config("mistral", sliding_window=128)
    with pytest.raises(NotImplementedError, match="sliding"):
        load_model(hf_config, None, torch.float32, CPU, load_format="dummy")


@pytest.mark.parametrize(
    ("arch", "expected"),
    [("llama", (2, 2, 16)), ("qwen3", (2, 2, 32)), ("mistral", (2, 2, 16))],
)
def test_kv_cache_spec_gives_layers_kv_heads_and_head_dim(arch, expected):
    assert get_kv_cache_spec(tiny_hf_config(arch)) == expected


def test_resolve_model_path_returns_a_local_folder_unchanged(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_resolve_model_path_rejects_a_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        resolve_model_path(str(tmp_path / "nope"))


def test_resolve_model_path_explains_an_unreachable_hub_id(monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="'acme/no-such-model'.*offline and not in the cache"):
        resolve_model_path("acme/no-such-model")
