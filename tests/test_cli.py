"""`lmserve generate`: engine flags spelled as vLLM spells them, clear errors."""

from __future__ import annotations

import json

import pytest

from lmserve.entrypoints.cli import main
from tests.modules_loaded import modules_loaded_by


def test_generate_prints_one_json_line_per_prompt(tiny_model_dir, capsys):
    rc = main(
        [
            "generate",
            tiny_model_dir("llama"),
            "--prompt",
            "The small engine",
            "--prompt",
            "A farmer",
            "--max-tokens",
            "3",
            "--json",
            "--quiet",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-num-seqs",
            "4",
            "--no-enable-prefix-caching",
            "--prefix-caching-hash-algo",
            "xxhash",
        ]
    )
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["The small engine", "A farmer"]
    assert all(len(line["token_ids"]) <= 3 for line in lines)


def test_bad_engine_flag_value_exits_2_with_the_reason(tiny_model_dir, capsys):
    rc = main(["generate", tiny_model_dir("llama"), "--prompt", "x", "--block-size", "12"])
    assert rc == 2
    assert "block_size=12" in capsys.readouterr().err


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("lmserve ")


def test_importing_lmserve_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, lmserve; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_serve_command_never_imports_the_benchmark_client_or_the_router():
    # Everything `lmserve serve` imports up to the server's own code (cli._cmd_serve).
    code = (
        "from lmserve.entrypoints import cli\n"
        "argv = ['serve', '--port', '1']\n"
        "args = cli.build_parser(argv).parse_args(argv)\n"
        "assert args.func is cli._cmd_serve\n"
        "import lmserve.engine.launcher, lmserve.config, lmserve.entrypoints.openai.server\n"
    )
    assert modules_loaded_by(code, ("lmserve.bench", "lmserve.router", "httpx")) == []


def test_top_level_help_lists_every_command_without_building_them(capsys):
    code = (
        "from lmserve.entrypoints import cli\n"
        "import contextlib, io\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    cli.main(['--help'])\n"
    )
    assert modules_loaded_by(code, ("lmserve.bench", "lmserve.router", "torch")) == []
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("serve", "generate", "router", "bench"))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["serve", "--help"], "--max-num-seqs"),
        (["generate", "--help"], "--max-tokens"),
        (["router", "--help"], "--routing-logic"),
        (["bench", "--help"], "throughput"),
        (["bench", "serve", "--help"], "--request-rate"),
        (["bench", "throughput", "--help"], "--max-num-seqs"),
        (["bench", "latency", "--help"], "--max-num-seqs"),
    ],
)
def test_every_command_help_shows_its_flags(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert expected in capsys.readouterr().out


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["srve"])
    assert exc.value.code == 2
    assert "invalid choice: 'srve'" in capsys.readouterr().err


def test_full_parser_and_lazy_parser_agree_on_serve_flags():
    from lmserve.entrypoints.cli import build_parser

    argv = ["serve", "m", "--port", "9", "--max-num-seqs", "3", "--no-enable-prefix-caching"]
    lazy, full = build_parser(argv).parse_args(argv), build_parser().parse_args(argv)
    assert vars(lazy) == vars(full)
    assert (lazy.port, lazy.max_num_seqs, lazy.enable_prefix_caching) == (9, 3, False)


def test_engine_flag_defaults_equal_the_config_defaults():
    """`lmserve serve`'s flags pass their defaults to EngineConfig explicitly, so a default
    changed in the config alone would not reach the server (gpu_memory_utilization once did
    not): every flag named like a config field must default to that field's default."""
    import dataclasses

    from lmserve import config
    from lmserve.engine.arg_utils import BOOL_FLAGS, ENGINE_FLAGS

    defaults = {}
    for cls in (config.ModelConfig, config.CacheConfig, config.SchedulerConfig,
                config.ParallelConfig, config.DeviceConfig):  # fmt: skip
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults.setdefault(f.name, f.default)  # the first (owning) config wins
    flags = [(dest, default) for _, dest, _, default, _ in ENGINE_FLAGS]
    flags += [(dest, default) for _, dest, default, _ in BOOL_FLAGS]
    compared = [(dest, default, defaults[dest]) for dest, default in flags if dest in defaults]
    assert len(compared) >= 10  # the table and the configs still share most names
    assert [c for c in compared if c[1] != c[2]] == []
