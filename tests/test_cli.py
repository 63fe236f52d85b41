"""`lmserve generate`: engine flags spelled as vLLM spells them, clear errors."""

from __future__ import annotations

import json

import pytest

from lmserve.entrypoints.cli import main


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
