"""`lmserve simulate` and `lmserve simulate calibrate` on the command line."""

from __future__ import annotations

import json

import pytest

from lmserve.entrypoints.cli import main
from tests.sim.test_profile import StepProfile, latency_result

SMALL = ["--profile", "cpu-tiny-llama", "--replicas", "3", "--dataset-name", "multi-round-qa",
         "--num-users", "12", "--num-rounds", "2", "--system-prompt-len", "64",
         "--question-len", "16", "--answer-len", "8", "--request-rate", "5"]  # fmt: skip


def test_simulate_compares_logics_and_writes_json_and_a_plot(tmp_path, capsys):
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    argv = ["simulate", *SMALL, "--routing-logic", "roundrobin,kv-aware", "--output", str(out),
            "--plot", str(png)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "TTFT ms" in printed and "kv-aware" in printed
    result = json.loads(out.read_text())
    assert [r["routing_logic"] for r in result["runs"]] == ["roundrobin", "kv-aware"]
    for run in result["runs"]:
        assert run["completed"] == 24 and run["p90_ttft_ms"] > 0
        assert len(run["per_replica"]) == 3
    assert png.stat().st_size > 1000


def test_simulate_finds_the_fewest_replicas_for_a_ttft_target(tmp_path):
    out = tmp_path / "sim.json"
    argv = ["simulate", *SMALL, "--num-users", "60", "--request-rate", "20",
            "--target-ttft-p90", "0.2", "--max-replicas", "8", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    best = json.loads(out.read_text())["runs"][0]
    assert best["meets_target"] and best["p90_ttft_ms"] <= 200
    fewer = [n for n in best["tried"] if int(n) < best["replicas"]]
    assert all(best["tried"][n] > 200 for n in fewer)


def test_calibrate_writes_a_profile_the_simulator_loads(tmp_path):
    truth = StepProfile("truth", 0.004, 2e-5, 3e-4, 1e-7)
    files = []
    for i, grid in enumerate([(1, 64, 32), (1, 1024, 32), (8, 256, 64), (32, 128, 128)]):
        path = tmp_path / f"lat{i}.json"
        path.write_text(json.dumps(latency_result(truth, *grid)))
        files.append(str(path))
    out = tmp_path / "profile.json"
    assert main(["simulate", "calibrate", "--results", *files, "--out", str(out),
                 "--num-gpu-blocks", "300"]) == 0  # fmt: skip
    assert json.loads(out.read_text())["num_gpu_blocks"] == 300
    assert main(["simulate", *SMALL, "--profile", str(out)]) == 0


def test_an_unknown_routing_logic_is_a_plain_error(capsys):
    assert main(["simulate", *SMALL, "--routing-logic", "fastest"]) == 2
    assert "fastest" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["simulate", "--help"], ["simulate", "calibrate", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "--routing-logic" in capsys.readouterr().out
