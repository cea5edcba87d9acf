#!/usr/bin/env python
"""How long `diff-transformer demo` takes, stage by stage, and what bf16 mixed precision buys its fine-tuning.

    python benchmarks/demo_timing.py            # runs the demo with its defaults in a fresh process and HF cache
    python benchmarks/demo_timing.py --steps    # only: fp32 vs bf16-autocast training steps of SmolLM2, interleaved

The full run starts `diff-transformer demo` in a subprocess (HF_HOME in a new temporary folder, so nothing is
cached), measures its wall time from process start to exit, keeps the per-stage table the demo prints, and records
the 1-minute load average before and after (the machine may be shared). `--steps` times forward + backward + AdamW
steps of 4 × 128 tokens of the SmolLM2-135M the demo fine-tunes, float32 and bf16 autocast alternating, and reports
the median of each and their ratio. Writes `benchmarks/results/demo_timing.md` (or `demo_steps.md`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_line(when: str) -> str:
    return f"1-minute load average {os.getloadavg()[0]:.2f} {when}"


def full_run(args) -> str:
    """Run the demo once with its defaults; return the markdown report."""
    load_before = load_line("before")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_HOME=str(Path(tmp) / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
        command = [sys.executable, "-m", "modeling_diff_cli.main", "demo", "--output-dir", str(Path(tmp) / "out")]
        started = time.perf_counter()
        # the demo's output is shown as it comes (its progress bars go to stderr, untouched) and kept for the report
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as demo:
            lines = []
            for line in demo.stdout:
                print(line, end="", flush=True)
                lines.append(line)
        seconds = time.perf_counter() - started
    load_after = load_line("after")
    if demo.returncode != 0:
        raise SystemExit(f"the demo failed (exit {demo.returncode}); its output is above")
    out = "".join(lines)
    stages = out[out.index("time per stage"):out.index("demo finished")].strip()
    ppl = out[out.index("| model | held-out ppl before"):].split("\n\n")[0]
    return (
        f"# `diff-transformer demo` timing\n\nProduced by `python benchmarks/demo_timing.py` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: the demo with its defaults, "
        f"OMP_NUM_THREADS={args.threads}, "
        f"a fresh HF cache.\n\n- Wall time from process start to exit: **{seconds:.0f} s ({seconds / 60:.1f} min)**\n"
        f"- Machine: {os.cpu_count()} logical cores; {load_before}, {load_after} (shared machine: other jobs ran)\n\n"
        f"{stages}\n\nHeld-out perplexity printed by that run:\n\n{ppl}\n"
    )


def steps_run(args) -> str:
    """Interleaved float32 / bf16-autocast (/ bf16 on 1 thread) training steps of SmolLM2-135M; the markdown."""
    import torch
    from modeling_diff_cli.common import embedded_smollm2, load_model  # the demo's own loader

    torch.set_num_threads(args.threads)
    load_before = load_line("before")
    model, _ = load_model(str(embedded_smollm2()))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(3, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    # (precision, threads): with more than one thread, bf16 on one thread too (OpenMP threads wait for each other
    # when other jobs hold the cores)
    variants = {f"float32, {args.threads} thread(s)": (False, args.threads),
                f"bf16 autocast, {args.threads} thread(s)": (True, args.threads)}
    if args.threads > 1:
        variants["bf16 autocast, 1 thread"] = (True, 1)
    times = {name: [] for name in variants}
    for repetition in range(args.repeats + 1):  # 0 is the warm-up
        for name in times if repetition % 2 == 0 else list(times)[::-1]:
            bf16, threads = variants[name]
            torch.set_num_threads(threads)
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if repetition:
                times[name].append(time.perf_counter() - started)
            print(f"{name}: {time.perf_counter() - started:.2f} s", flush=True)
    median = {name: statistics.median(v) for name, v in times.items()}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return (
        f"# Demo fine-tuning step: float32 vs bf16 autocast\n\nProduced by `python benchmarks/demo_timing.py --steps "
        f"--threads {args.threads} --repeats {args.repeats}` "
        f"on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: SmolLM2-135M-Instruct, forward + backward + AdamW "
        f"of 4 × 128 tokens, the variants alternating, median of {args.repeats} after a "
        f"warm-up.\n\n- Machine: {cpu}, {os.cpu_count()} logical cores; {load_before}, {load_line('after')} "
        f"(shared machine)\n- Versions: torch {torch.__version__}\n\n"
        "| precision, threads | median s/step | ratio to the first row |\n"
        "| --- | --- | --- |\n"
        + "\n".join(f"| {n} | {m:.2f} | {m / next(iter(median.values())):.2f}× |" for n, m in median.items())
        + "\n\nEvery step: " + ", ".join(f"{n} " + " ".join(f"{t:.2f}" for t in v) for n, v in times.items()) + "\n"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", action="store_true", help="only time float32 vs bf16-autocast training steps")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default: 2, the demo's)")
    parser.add_argument("--repeats", type=int, default=6, help="--steps: timed steps per precision (default: 6)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file (default: benchmarks/results/demo_timing.md, or demo_steps.md)")
    args = parser.parse_args(argv)
    text = steps_run(args) if args.steps else full_run(args)
    out = args.out or HERE / "results" / ("demo_steps.md" if args.steps else "demo_timing.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
