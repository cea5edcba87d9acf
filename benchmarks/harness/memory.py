"""Memory measures: the peak of live tensors during a training step, and a process's peak RSS in a fresh process.

`measure_in_subprocess(spec)` runs `python -m benchmarks.harness.memory SPEC_JSON` and reads its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.harness.models import ROOT, build_model, random_ids
from benchmarks.harness.timing import generate_seconds, train_step_seconds


def peak_allocated_mib(model, ids: torch.Tensor) -> float:
    """Peak of the bytes held by live tensors during one forward + backward, above what was live before (MiB).

    The CPU analogue of `torch.cuda.max_memory_allocated`: torch.profiler records every allocation and free of
    PyTorch's CPU allocator with its size; their running sum, in time order, peaks at the answer. Unlike the
    process RSS it carries no malloc slack, so it is the same from run to run.
    """
    from torch.profiler import ProfilerActivity, profile

    model.train()
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def process_memory(*fields: str) -> dict:
    """Fields of /proc/self/status in bytes (Linux): `VmHWM` (the peak RSS), `VmRSS` (now), `RssAnon` (now, without
    file-backed pages such as a memory-mapped checkpoint)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {field: int(status[field].split()[0]) * 1024 for field in fields}


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec: dict) -> dict:
    """Runs inside a fresh process: build one model and measure the peak RSS of one task.

    `spec["task"]` is `"train"` (one forward + backward at `seq_len`) or `"generate"` (`model.generate` of
    `new_tokens` tokens after a `seq_len` prompt). Returns MiB: RSS before, absolute peak, and the increase.
    """
    torch.set_num_threads(spec["threads"])
    model = build_model(spec["model"], spec["numbers"], spec.get("attn_implementation", "sdpa"))
    ids = random_ids(spec["numbers"]["vocab_size"], spec["seq_len"], seed=1)
    before = process_memory("VmRSS")["VmRSS"]
    reset_ok = reset_peak_rss()
    if spec["task"] == "train":
        train_step_seconds(model, ids)
    elif spec["task"] == "generate":
        generate_seconds(model, ids, spec["new_tokens"])
    else:
        raise ValueError(spec["task"])
    peak = process_memory("VmHWM")["VmHWM"]
    return {
        "rss_before_mib": before / 2**20,
        "peak_rss_mib": peak / 2**20,
        "peak_increase_mib": (peak - before) / 2**20,
        "hwm_reset": reset_ok,
    }


def measure_in_subprocess(spec: dict) -> dict:
    """Run `memory_worker(spec)` in a fresh Python process (so earlier allocations cannot hide the peak).

    glibc serves large blocks from the heap once its mmap threshold has grown (it adapts to the sizes freed), and a
    freed block left in the heap still counts in the RSS: with the default setting the RSS of the same step moved
    by tens of percent between runs. Pinning the threshold at 64 KiB sends every tensor of that size or more to
    mmap, so a free gives the memory back and the peak RSS follows the bytes that were live.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("HF_HUB_OFFLINE", "1")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.harness.memory", json.dumps(spec)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory worker failed for {spec}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(memory_worker(json.loads(sys.argv[1]))))
