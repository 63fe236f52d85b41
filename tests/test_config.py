"""EngineConfig validation: errors name the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from lmserve.config import CacheConfig, ConfigError, EngineConfig, ModelConfig, SchedulerConfig


@pytest.mark.parametrize("block_size", [0, 3, 12, 512, -16, 16.0, True])
def test_block_size_must_be_a_power_of_two(block_size):
    with pytest.raises(ConfigError, match=r"CacheConfig\.block_size=.*power of two"):
        CacheConfig(block_size=block_size)


def test_max_num_batched_tokens_below_one_is_rejected():
    with pytest.raises(ConfigError, match=r"max_num_batched_tokens=0 .*>= 1"):
        SchedulerConfig(max_num_batched_tokens=0)


def test_unchunked_budget_must_cover_max_model_len():
    with pytest.raises(ConfigError, match=r"max_num_batched_tokens=512 .*max_model_len=1024"):
        SchedulerConfig(
            max_num_batched_tokens=512, max_model_len=1024, enable_chunked_prefill=False
        )


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization=1.5 .*\(0, 1\]"),
        ({"prefix_caching_hash_algo": "md5"}, r"prefix_caching_hash_algo='md5'"),
        ({"num_gpu_blocks_override": 0}, r"num_gpu_blocks_override=0"),
    ],
)
def test_cache_config_rejects_bad_values(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        CacheConfig(**kwargs)


def test_scheduling_policy_must_be_known():
    with pytest.raises(ConfigError, match=r"policy='lifo'.*fcfs"):
        SchedulerConfig(policy="lifo")


def test_max_model_len_beyond_the_model_limit_is_rejected(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"max_model_len=4096 .*max_position_embeddings=2048"):
        EngineConfig.from_kwargs(tiny_model_dir("llama"), max_model_len=4096)


def test_unknown_engine_argument_lists_the_accepted_ones(tiny_model_dir):
    with pytest.raises(TypeError, match=r"unknown engine argument 'max_num_seq'.*max_num_seqs"):
        EngineConfig.from_kwargs(tiny_model_dir("llama"), max_num_seq=4)


def test_dtype_names_are_checked(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"dtype='float8'"):
        EngineConfig.from_kwargs(tiny_model_dir("llama"), dtype="float8")


def test_kwargs_land_in_their_sub_configs(tiny_model_dir):
    config = EngineConfig.from_kwargs(
        tiny_model_dir("llama"),
        block_size=32,
        max_num_seqs=7,
        max_model_len=256,
        scheduling_policy="priority",
        dtype="bfloat16",
    )
    assert config.cache_config.block_size == 32
    assert config.scheduler_config.max_num_seqs == 7
    assert config.scheduler_config.max_model_len == 256  # copied from the model config
    assert config.scheduler_config.policy == "priority"
    assert str(config.model_config.dtype) == "torch.bfloat16"


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises((ConfigError, ValueError, OSError), match="nope"):
        EngineConfig.from_kwargs(str(tmp_path / "nope"))


def test_a_malformed_config_json_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig(model=str(tmp_path))


def test_max_num_seqs_defaults_to_256_on_the_cpu(tiny_model_dir):
    config = EngineConfig.from_kwargs(tiny_model_dir("llama"), device="cpu")
    assert config.scheduler_config.max_num_seqs == 256


@pytest.mark.parametrize(
    ("name", "gib", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 79.1, 1024),
        ("NVIDIA H200", 139.8, 1024),
        ("NVIDIA A100-SXM4-80GB", 79.2, 256),  # vLLM measured a larger batch slower there
        ("NVIDIA L4", 22.0, 256),
    ],
)
def test_max_num_seqs_defaults_by_gpu_size_as_vllms_server(monkeypatch, name, gib, expected):
    import types

    import torch

    from lmserve.config import default_max_num_seqs

    props = types.SimpleNamespace(name=name, total_memory=int(gib * 2**30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    assert default_max_num_seqs("cuda") == expected
    assert default_max_num_seqs("cpu") == 256
