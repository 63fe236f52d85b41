"""`kv_transfer_config` / `--kv-transfer-config`: vLLM's keys, and clear errors for bad input."""

from __future__ import annotations

import pytest

from lmserve.config import ConfigError, EngineConfig, KVTransferConfig
from lmserve.entrypoints.cli import main


def tiered(**extra) -> dict:
    return {"kv_connector": "TieredConnector", "kv_connector_extra_config": extra}


def test_defaults_turn_on_a_cpu_tier_of_256_token_chunks():
    config = KVTransferConfig.from_user(tiered())
    assert (config.options.chunk_size, config.options.cpu_size_gib) == (256, 4.0)
    assert config.loads and config.saves
    producer = KVTransferConfig.from_user({**tiered(), "kv_role": "kv_producer"})
    assert producer.saves and not producer.loads


def test_json_string_is_accepted_as_on_the_command_line():
    config = KVTransferConfig.from_user('{"kv_connector": "TieredConnector"}')
    assert config.kv_connector == "TieredConnector"


@pytest.mark.parametrize(
    "value, message",
    [
        ({"kv_connector": "LMCacheConnectorV1"}, "kv_connector='LMCacheConnectorV1'"),
        ({**tiered(), "kv_role": "both"}, "kv_role='both'"),
        ({"kv_role": "kv_both"}, "missing required key(s) ['kv_connector']"),
        ({**tiered(), "kv_parallel_size": 2}, "unknown key(s) ['kv_parallel_size']"),
        (tiered(chunk_sise=256), "unknown key(s) ['chunk_sise']"),
        (tiered(chunk_size=0), "chunk_size=0"),
        (tiered(cpu_size_gib=-1), "cpu_size_gib=-1"),
        (tiered(cpu_size_gib=0), "turns off the only tier"),
        (tiered(remote_url="http://redis:6379"), "must be a redis:// URL"),
        (tiered(disk_path=""), "disk_path=''"),
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a dict"),
    ],
)
def test_bad_values_name_the_field(value, message):
    with pytest.raises(ConfigError) as exc:
        KVTransferConfig.from_user(value)
    assert message in str(exc.value)


def test_chunk_size_must_be_a_multiple_of_the_block_size(tiny_model_dir):
    with pytest.raises(ConfigError, match="multiple of block_size=16"):
        EngineConfig.from_kwargs(
            tiny_model_dir("llama"), device="cpu", kv_transfer_config=tiered(chunk_size=40)
        )


def test_cli_flag_with_bad_json_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--kv-transfer-config", "{oops", "--prompt", "x"])
    assert exc.value.code == 2
    assert "--kv-transfer-config is not valid JSON" in capsys.readouterr().err


def test_cli_flag_reaches_the_engine_config(tiny_model_dir, capsys):
    rc = main(["generate", tiny_model_dir("llama"), "--prompt", "x", "--max-tokens", "2",
               "--device", "cpu", "--quiet", "--kv-transfer-config",
               '{"kv_connector": "TieredConnector", "kv_connector_extra_config": '
               '{"chunk_size": 24}}'])  # fmt: skip
    assert rc == 2
    assert "multiple of block_size=16" in capsys.readouterr().err
