"""Is batch-1 decode bound by the GPU or by the host? For each shape, one run of lmserve (CUDA
graphs, async scheduling) measures:

  step_us          wall time per decoded token, end to end (`batch1_decode_tok_s`)
  graph_us         GPU time of one replay of the batch-1 decode graph (the forward, and the LM
                   head when the graph holds it), alone
  tail_us          GPU time of the eager tail: the LM head unless the graph holds it, and greedy
                   sampling, alone
  host_busy_us     host time per engine step outside the wait for the device
  host_wait_us     host time per engine step blocked on the step's device->host copy

If host_wait_us is near zero the host is the bound (the device idles between steps); if it is
most of step_us, the device is. Dummy weights at real shapes, bf16. Prints a table, writes JSON.

    python benchmarks/decode_step_breakdown.py --shapes 0.5b,8b --out breakdown.json
    python benchmarks/decode_step_breakdown.py --shapes 135m    # the default model's shape
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("LMSERVE_ENABLE_MULTIPROCESSING", "0")

from benchmarks.gpu_shapes import batch1_decode_tok_s, write_shape  # noqa: E402
from lmserve import LLM, SamplingParams  # noqa: E402
from lmserve.sample.sampler import greedy_argmax  # noqa: E402
from lmserve.worker import model_runner as model_runner_module  # noqa: E402


def _gpu_us(fn, reps: int = 200) -> float:
    """GPU time per call of `fn` (queued back to back, CUDA events around all of them)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def _host_split(llm, tokens: int) -> tuple[float, float]:
    """(busy, waiting) host microseconds per engine step over one `tokens`-long generation."""
    step_output = model_runner_module.StepOutput
    original = step_output.result
    waited = [0.0]

    def timed_result(self):
        if self.copied is not None and self.output is None:
            start = time.perf_counter()
            self.copied.synchronize()
            waited[0] += time.perf_counter() - start
        return original(self)

    prompt = [{"prompt_token_ids": list(range(1000, 1128))}]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    step_output.result = timed_result
    try:
        start = time.perf_counter()
        llm.generate(prompt, params, use_tqdm=False)
        total = time.perf_counter() - start
    finally:
        step_output.result = original
    return (total - waited[0]) * 1e6 / tokens, waited[0] * 1e6 / tokens


def breakdown(path: str) -> dict:
    llm = LLM(
        path, load_format="dummy", dtype="bfloat16", device="cuda", skip_tokenizer_init=True,
        max_model_len=2048, gpu_memory_utilization=0.8,
    )  # fmt: skip
    row = {"step_us": round(1e6 / batch1_decode_tok_s(llm), 1)}
    runner = llm.llm_engine.engine_core.engine_core.executor.worker.model_runner
    graph = runner.graphs.full[1]
    row["graph_us"] = round(_gpu_us(lambda: graph.replay(1)), 1)
    hidden = graph.output[:1]  # [1, hidden_size]

    def tail():
        if graph.logits is not None:
            return greedy_argmax(graph.logits[:1])  # [1, vocab] -> [1]
        return greedy_argmax(runner.model.compute_logits(hidden))

    with torch.inference_mode():
        row["tail_us"] = round(_gpu_us(tail), 1)
    busy, wait = _host_split(llm, 256)
    row["host_busy_us"], row["host_wait_us"] = round(busy, 1), round(wait, 1)
    llm.shutdown()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="0.5b,8b")
    parser.add_argument("--out", default="decode_step_breakdown.json")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes.split(","):
            result["shapes"][shape] = breakdown(write_shape(tmp, shape))
            torch.cuda.empty_cache()
    print(f"{'shape':6} {'step':>8} {'graph':>8} {'tail':>8} {'busy':>8} {'wait':>8}  (us)")
    for shape, r in result["shapes"].items():
        print(f"{shape:6} {r['step_us']:8.1f} {r['graph_us']:8.1f} {r['tail_us']:8.1f} "
              f"{r['host_busy_us']:8.1f} {r['host_wait_us']:8.1f}")  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
