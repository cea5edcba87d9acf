"""How long `diff-transformer demo` takes, stage by stage, and what bf16 mixed precision buys its fine-tuning.

    python -m benchmarks.system.demo_timing            # the demo with its defaults in a fresh process and HF cache
    python -m benchmarks.system.demo_timing --steps    # only: fp32 vs bf16-autocast training steps, interleaved

The full run starts `diff-transformer demo` in a subprocess (HF_HOME in a new temporary folder, so nothing is
cached), measures its wall time from process start to exit, keeps the per-stage table and the perplexities the demo
prints, and records the load average before and after (the machine may be shared). `--steps` times forward +
backward + AdamW steps of 4 × 128 tokens of the SmolLM2-135M the demo fine-tunes, float32 and bf16 autocast (and
bf16 on one thread when `--threads` is more) interleaved, and reports the median of each and their ratio. Writes
`benchmarks/results/demo_timing/demo_timing.md` (or `steps.md`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness.report import RESULTS, command, header, machine_info, table, write_results
from benchmarks.harness.timing import time_interleaved


def full_run(args, info: dict) -> str:
    """Run the demo once with its defaults; return the markdown report."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, HF_HOME=str(Path(tmp) / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
        argv = [sys.executable, "-m", "modeling_diff_cli.main", "demo", "--output-dir", str(Path(tmp) / "out")]
        started = time.perf_counter()
        # the demo's output is shown as it comes (its progress bars go to stderr, untouched) and kept for the report
        with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True) as demo:
            lines = []
            for line in demo.stdout:
                print(line, end="", flush=True)
                lines.append(line)
        seconds = time.perf_counter() - started
    if demo.returncode != 0:
        raise SystemExit(f"the demo failed (exit {demo.returncode}); its output is above")
    out = "".join(lines)
    stages = out[out.index("time per stage"):out.index("demo finished")].strip()
    ppl = out[out.index("| model | held-out ppl before"):].split("\n\n")[0]
    text = header("`diff-transformer demo` timing", command("benchmarks.system.demo_timing", args.argv), info,
                  f"The demo with its defaults, OMP_NUM_THREADS={args.threads}, a fresh HF cache",
                  f"Wall time from process start to exit: **{seconds:.0f} s ({seconds / 60:.1f} min)**")
    return "\n".join(text) + f"\n{stages}\n\nHeld-out perplexity printed by that run:\n\n{ppl}\n"


def steps_run(args, info: dict) -> str:
    """Interleaved float32 / bf16-autocast (/ bf16 on 1 thread) training steps of SmolLM2-135M; the markdown."""
    import torch
    from modeling_diff_cli.common import embedded_smollm2, load_model  # the demo's own loader

    model, _ = load_model(str(embedded_smollm2()))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(3, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    # (bf16, threads): with more than one thread, bf16 on one thread too (OpenMP threads wait for each other when
    # other jobs hold the cores)
    variants = {f"float32, {args.threads} thread(s)": (False, args.threads),
                f"bf16 autocast, {args.threads} thread(s)": (True, args.threads)}
    if args.threads > 1:
        variants["bf16 autocast, 1 thread"] = (True, 1)

    def step(variant):
        bf16, threads = variant
        torch.set_num_threads(threads)
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - started

    raw = time_interleaved(variants, [("step", step)], args.repeats)
    times = {name: values["step"] for name, values in raw.items()}
    median = {name: statistics.median(v) for name, v in times.items()}
    first = next(iter(median.values()))
    text = header("Demo fine-tuning step: float32 vs bf16 autocast",
                  command("benchmarks.system.demo_timing", args.argv), info,
                  "SmolLM2-135M-Instruct, forward + backward + AdamW of 4 × 128 tokens, the variants alternating, "
                  f"median of {args.repeats} after a warm-up")
    rows = [[name, f"{m:.2f}", f"{m / first:.2f}×"] for name, m in median.items()]
    return ("\n".join(text) + table(["precision, threads", "median s/step", "ratio to the first row"], rows)
            + "\n\nEvery step: " + ", ".join(f"{n} " + " ".join(f"{t:.2f}" for t in v) for n, v in times.items()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", action="store_true", help="only time float32 vs bf16-autocast training steps")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default: 2, the demo's)")
    parser.add_argument("--repeats", type=int, default=6, help="--steps: timed steps per precision (default: 6)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file (default: benchmarks/results/demo_timing/demo_timing.md, or steps.md)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    info = machine_info(args.threads)
    text = steps_run(args, info) if args.steps else full_run(args, info)
    write_results(args.out or RESULTS / "demo_timing" / ("steps.md" if args.steps else "demo_timing.md"), text)


if __name__ == "__main__":
    main()
