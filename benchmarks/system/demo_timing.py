"""How long `diff-transformer demo` takes, stage by stage, and what one of its fine-tuning steps costs.

    python -m benchmarks.system.demo_timing            # the demo in a fresh process and HF cache
    python -m benchmarks.system.demo_timing --demo-args "--no-bf16 --threads 2"   # with the demo's own flags
    python -m benchmarks.system.demo_timing --steps    # only: fp32 vs bf16-autocast training steps, interleaved
    python -m benchmarks.system.demo_timing --breakdown  # only: forward, backward, AdamW of a step, on the CPU clock

The full run starts `diff-transformer demo` in a subprocess (HF_HOME in a new temporary folder, so nothing is
cached), measures its wall time from process start to exit, keeps the plan the demo chose and why, the per-stage
table and the perplexities it prints, and records the load average before and after (the machine may be shared).
`--steps` times forward + backward + AdamW steps of 4 × 128 tokens of the SmolLM2-135M the demo fine-tunes, float32
and bf16 autocast (and bf16 on one thread when `--threads` is more) interleaved, and reports the median of each and
their ratio. `--breakdown` times the forward, the backward and the AdamW step apart, float32 and bf16 autocast, at
4 × 128 and 4 × 64 tokens, on one thread and its CPU clock (which leaves out the time other jobs hold the core), and
sets them against the step's matmul FLOPs: what the demo's time budget has to work with. Writes
`benchmarks/results/demo_timing/demo_timing.md` (or `steps.md`, `breakdown.md`).
"""

from __future__ import annotations

import argparse
import os
import shlex
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
        argv += shlex.split(args.demo_args)
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
    plan = [line for line in out.splitlines() if line.startswith(("forward + backward of", "plan:", "why:"))]
    notes = out[out.index("What this run can and cannot show:"):].split("\n\n")[0]
    flags = f"`diff-transformer demo {args.demo_args}`" if args.demo_args else "The demo with its defaults"
    text = header("`diff-transformer demo` timing", command("benchmarks.system.demo_timing", args.argv), info,
                  f"{flags}, OMP_NUM_THREADS={args.threads}, a fresh HF cache",
                  f"Wall time from process start to exit: **{seconds:.0f} s ({seconds / 60:.1f} min)**")
    return ("\n".join(text) + "\nWhat the demo chose:\n\n" + "".join(f"    {line}\n" for line in plan)
            + f"\n{stages}\n\nHeld-out perplexity printed by that run:\n\n{ppl}\n\n{notes}\n")


def steps_run(args, info: dict) -> str:
    """Interleaved float32 / bf16-autocast (/ bf16 on 1 thread) training steps of SmolLM2-135M; the markdown."""
    import torch
    from modeling_diff_conversion.loading import embedded_smollm2, load_model  # the demo's own loader

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
    return ("\n".join(text) + "\n" + table(["precision, threads", "median s/step", "ratio to the first row"], rows)
            + "\n\nEvery step: " + ", ".join(f"{n} " + " ".join(f"{t:.2f}" for t in v) for n, v in times.items()))


def matmul_flops(config, tokens: int) -> float:
    """FLOPs of the weight matmuls of one training step of a Llama-shaped LM: the q/k/v/o and MLP projections of every
    layer and the LM head, forward (2 per weight and token) and backward (twice the forward: input and weight
    gradients). The attention products are left out (a few percent at the demo's 128 tokens)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = config.hidden_size * (2 * q_width + 2 * kv_width) + 3 * config.hidden_size * config.intermediate_size
    weights = config.num_hidden_layers * per_layer + config.hidden_size * config.vocab_size
    return 3 * 2 * weights * tokens


def breakdown_run(args, info: dict) -> str:
    """Forward / backward / AdamW seconds of one training step of SmolLM2-135M, on one thread's CPU clock."""
    import torch
    from modeling_diff_conversion.loading import embedded_smollm2, load_model  # the demo's own loader

    torch.set_num_threads(1)
    model, _ = load_model(str(embedded_smollm2()))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    clock = time.process_time
    variants = {f"{'bf16 autocast' if bf16 else 'float32'}, 4 × {seq}": (bf16, seq)
                for bf16 in (False, True) for seq in (128, 64)}

    def step(variant):
        bf16, seq = variant
        ids = torch.randint(3, model.config.vocab_size, (4, seq), generator=torch.Generator().manual_seed(0))
        started = clock()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        forward = clock()
        loss.backward()
        backward = clock()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return forward - started, backward - forward, clock() - backward

    raw = time_interleaved(variants, [("step", step)], args.repeats)
    rows = []
    for name, (bf16, seq) in variants.items():
        phases = [statistics.median(values) for values in zip(*raw[name]["step"])]  # forward, backward, AdamW
        total = sum(phases)
        flops = matmul_flops(model.config, 4 * seq)
        rows.append([name, *(f"{t:.2f}" for t in phases), f"{total:.2f}",
                     f"{phases[2] / total:.0%}", f"{flops / 1e12:.3f}", f"{flops / (total - phases[2]) / 1e9:.0f}"])
    text = header("Demo fine-tuning step: forward, backward and AdamW",
                  command("benchmarks.system.demo_timing", args.argv), info,
                  "SmolLM2-135M-Instruct, one training step of batch 4, float32 and bf16 autocast, 128 and 64 tokens "
                  f"per sequence, the variants alternating, median of {args.repeats} after a warm-up, 1 thread, "
                  "seconds of this process's CPU time (the time other jobs held the core left out)",
                  "Matmul TFLOP per step: the q/k/v/o, MLP and LM-head weight matmuls, forward and backward (2× the "
                  "forward), attention products left out; GFLOP/s divides them by the forward + backward seconds")
    head = ["precision, tokens", "forward s", "backward s", "AdamW s", "step s", "AdamW share", "matmul TFLOP",
            "GFLOP/s (fwd + bwd)"]
    return "\n".join(text) + "\n" + table(head, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", action="store_true", help="only time float32 vs bf16-autocast training steps")
    parser.add_argument("--breakdown", action="store_true",
                        help="only time the forward, backward and AdamW of a step (float32, bf16; 128, 64 tokens)")
    parser.add_argument("--demo-args", default="",
                        help='the full run: flags for the demo, e.g. "--no-bf16 --threads 2"')
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads (default: 2, the demo's)")
    parser.add_argument("--repeats", type=int, default=6,
                        help="--steps, --breakdown: timed steps per variant (default: 6)")
    parser.add_argument("--out", type=Path, default=None,
                        help="markdown file (default: benchmarks/results/demo_timing/demo_timing.md, steps.md or "
                        "breakdown.md)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    info = machine_info(args.threads)
    if args.breakdown:
        text, name = breakdown_run(args, machine_info(1)), "breakdown.md"
    elif args.steps:
        text, name = steps_run(args, info), "steps.md"
    else:
        text, name = full_run(args, info), "demo_timing.md"
    write_results(args.out or RESULTS / "demo_timing" / name, text)


if __name__ == "__main__":
    main()
