"""The README's two commands are what CI runs: read out of README.md by .ci/readme_commands.py,
which .ci/run uses for both steps, so README and CI cannot drift apart."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def readme_commands():
    spec = importlib.util.spec_from_file_location(
        "readme_commands", ROOT / ".ci/readme_commands.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_command_sets_up_without_the_test_extra_and_ends_in_lmserve_serve(readme_commands):
    serve = readme_commands.command("serve")
    steps = [step.strip() for step in serve.split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[-1] == "lmserve serve"
    assert "pip install -c constraints.txt -e ." in steps
    assert "[test]" not in serve


def test_test_command_installs_the_test_extra_and_runs_pytest(readme_commands):
    steps = [step.strip() for step in readme_commands.command("test").split("&&")]
    assert steps[0] == "python3 -m venv .venv" and steps[-1] == "python -m pytest -q"
    assert 'pip install -c constraints.txt -e ".[test]"' in steps


def test_chat_curl_posts_a_chat_request_for_the_default_model(readme_commands):
    words = shlex.split(readme_commands.command("chat"))
    assert words[:2] == ["curl", "http://127.0.0.1:8000/v1/chat/completions"]
    body = json.loads(words[words.index("-d") + 1])
    assert body["model"] == "SmolLM2-135M-Instruct" and body["messages"][0]["role"] == "user"


def test_ci_runs_both_readme_commands_through_the_reader():
    run = (ROOT / ".ci/run").read_text()
    assert "python3 .ci/check_serve.py" in run
    assert 'bash -c "$(python3 .ci/readme_commands.py test)"' in run
    check = (ROOT / ".ci/check_serve.py").read_text()
    assert 'command("serve")' in check and 'command("chat")' in check


def test_reader_refuses_a_readme_without_exactly_one_serve_command(readme_commands):
    block = "```bash\n# set up, then serve the model\n{}\n```\n"
    with pytest.raises(SystemExit, match="found 0"):
        readme_commands.command("serve", "no commands here")
    with pytest.raises(SystemExit, match="found 2"):
        readme_commands.command("serve", block.format("a") + block.format("b"))
    assert readme_commands.command("serve", block.format("lmserve serve")) == "lmserve serve"
