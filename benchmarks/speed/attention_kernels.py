"""The V1 differential-attention core alone: which way of computing it is fastest on CPU sdpa?

Differential attention (paper V1) per differential head i of KV group g:

    out_i = softmax(q1_i k1_gᵀ/√d) v_g - λ softmax(q2_i k2_gᵀ/√d) v_g,     q, k of width d, v of width 2d

with the cache layout of `modeling_diff`: one key of width 2d per KV group holding k1‖k2, one value of width
2d, as many key heads as value heads. The candidate schemes, all reading that layout without changing it:

    llama       baseline: Llama's core with the same config numbers (H query heads, 2G KV heads, width d)
    (a) padded  what the model does: q1 zero-padded on the right and q2 on the left to 2d, so both maps come
                from ONE sdpa call on the cache key/value as they are (QKᵀ at width 2d: 2× Llama's FLOPs);
                the padded queries are built by one `torch.diag_embed`, the two maps of a head adjacent
    (a')        the same with the padded queries built by pad + pad + stack, maps outermost in each KV group
                (what the model did before; three kernels instead of one)
    (b) 4-call  the split-value scheme of the official `multihead_flashdiff_2.py`: q1/k1 with each half of v,
                q2/k2 likewise, four sdpa calls at width d (QKᵀ computed twice per map: 2× Llama's FLOPs)
    (c) 2-call  q/k of width d against v of width 2d, one call per map (1.5× Llama's FLOPs if a kernel took it)
    (d) maps    materialised maps in plain torch: S1, S2 at width d, A = softmax(S1) - λ softmax(S2), A·v once
                (exactly Llama's FLOPs, but no causal block skipping and T² memory per head)

Timed, interleaved and median of `--repeats`: the training core (forward + backward, causal, batch 1) at each
`--seq-lens`, and one decode step (one query token per head against a cache of `--cache-lens` tokens, no grad).
Every scheme is checked against (d) for equal outputs first. Writes
`benchmarks/results/attention_kernels/attention_kernels.md` and a PNG next to it; `--profile` appends
torch.profiler's top operators of each scheme at the first T.

    python -m benchmarks.speed.attention_kernels            # about 2 minutes on 2 cores
    python -m benchmarks.speed.attention_kernels --quick    # tiny settings, for the smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import report
from benchmarks.harness.cores import CORES, core_maps, make_inputs
from benchmarks.harness.timing import time_interleaved

SCHEMES = ("llama", "padded", "padded-stack", "4-call", "2-call", "maps")
DESCRIPTIONS = {
    "llama": "Llama core: 1 sdpa call, q/k/v width d (baseline)",
    "padded": "(a) zero-padded q (one diag_embed), 1 sdpa call at width 2d (the model's choice)",
    "padded-stack": "(a') as (a), q padded by pad+pad+stack",
    "4-call": "(b) 4 sdpa calls at width d, split value (multihead_flashdiff_2)",
    "2-call": "(c) 2 sdpa calls, q/k width d, v width 2d",
    "maps": "(d) materialised maps in plain torch",
}


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def train_seconds(scheme, inputs) -> float:
    """Forward + backward of the core, causal, on pre-built inputs."""
    for tensor in inputs:
        tensor.grad = None
    start = time.perf_counter()
    out = CORES[scheme](*inputs, causal=True)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(scheme, inputs, steps: int) -> float:
    """Seconds per decode step: one query token per head against the whole cache (mean over `steps`)."""
    start = time.perf_counter()
    for _ in range(steps):
        CORES[scheme](*inputs, causal=False)
    return (time.perf_counter() - start) / steps


def check_equal(args) -> dict:
    """Max abs difference of each V1 scheme to (d) on one small causal problem and one decode step."""
    differences = {}
    for scheme in SCHEMES[1:]:
        worst = 0.0
        for length, source, causal in ((64, 64, True), (1, 64, False)):
            inputs = make_inputs(scheme, length, source, args, requires_grad=False)
            reference = core_maps(*inputs, causal=causal)
            worst = max(worst, (CORES[scheme](*inputs, causal=causal) - reference).abs().max().item())
        differences[scheme] = worst
    return differences


def profile_schemes(length, args) -> str:
    """torch.profiler's top operators (self CPU time) of forward + backward of every scheme at T=length."""
    from torch.profiler import ProfilerActivity, profile

    tables = []
    for scheme in SCHEMES:
        inputs = make_inputs(scheme, length, length, args, requires_grad=True)
        train_seconds(scheme, inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_seconds(scheme, inputs)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
        tables.append(f"### {scheme} (T={length}, forward + backward)\n\n```\n{table}\n```\n")
    return "\n".join(tables)


def run(args) -> dict:
    """Time every scheme, interleaved; return {measure: {scheme: median seconds}}."""
    measures = []
    for length in args.seq_lens:
        inputs = {s: make_inputs(s, length, length, args, requires_grad=True) for s in SCHEMES}
        measures.append((f"train_{length}", lambda scheme, x=inputs: train_seconds(scheme, x[scheme])))
    for source in args.cache_lens:
        inputs = {s: make_inputs(s, 1, source, args, requires_grad=False) for s in SCHEMES}
        measures.append((f"decode_{source}",
                         lambda scheme, x=inputs: decode_seconds(scheme, x[scheme], args.decode_steps)))
    raw = time_interleaved({scheme: scheme for scheme in SCHEMES}, measures, args.repeats)
    return {key: {s: statistics.median(raw[s][key]) for s in SCHEMES} for key, _ in measures}


def markdown(results, differences, info, args, profile_text: str = "") -> str:
    """The results file: settings, the table of ratios to Llama's core, the equality check."""
    lines = report.header(
        "The V1 attention core alone, CPU sdpa", report.command("benchmarks.speed.attention_kernels", args.argv), info,
        f"Shapes: {args.heads} query heads, {args.kv_heads} KV heads (Llama's counting), head_dim {args.head_dim}, "
        f"batch 1, float32. Median of {args.repeats} after a warm-up, schemes interleaved.",
        f"Decode: mean of {args.decode_steps} steps of one query token per head against a cache of S tokens.",
    )
    lines += [
        "Each cell: ratio to Llama's core · absolute time.",
        "",
        "| scheme | " + " | ".join(
            (f"fwd+bwd T={k[6:]}" if k.startswith("train") else f"decode step S={k[7:]}") for k in results
        ) + " |",
        "| --- | " + " | ".join("---" for _ in results) + " |",
    ]
    for scheme in SCHEMES:
        cells = []
        for values in results.values():
            seconds = values[scheme]
            unit = f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"
            cells.append(f"{seconds / values['llama']:.3g}× · {unit}")
        lines.append(f"| {DESCRIPTIONS[scheme]} | " + " | ".join(cells) + " |")
    lines += ["", "Max |difference| to (d) on a 64-token causal problem and a decode step (all schemes compute "
              "the same function):", ""]
    lines += [f"- {scheme}: {value:.2e}" for scheme, value in differences.items()]
    lines += ["", f"![ratio to Llama's core]({args.out.with_suffix('.png').name})", ""]
    if profile_text:
        lines += ["## torch.profiler, top operators by self CPU time", "", profile_text]
    return "\n".join(lines)


def plot(results, path: Path, args) -> dict:
    """Grouped bars: ratio of each V1 scheme to Llama's core, per measure; returns the plotted ratios."""
    keys = list(results)
    series = {DESCRIPTIONS[scheme]: [results[k][scheme] / results[k]["llama"] for k in keys] for scheme in SCHEMES[1:]}
    labels = [k.replace("train_", "fwd+bwd T=").replace("decode_", "decode S=") for k in keys]
    return report.bar_chart(path, labels, series, "time / Llama's core time",
                            f"V1 attention core, CPU sdpa, {args.heads} heads / {args.kv_heads} KV heads, "
                            f"d={args.head_dim}, {args.threads} threads")


def parse_args(argv=None):
    """Command-line flags (every one has --help text)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 4096],
                        help="T of the causal forward+backward measure (default: 512 2048 4096)")
    parser.add_argument("--cache-lens", type=int, nargs="+", default=[640, 8192],
                        help="cache lengths S of the decode-step measure (default: 640 8192)")
    parser.add_argument("--heads", type=int, default=8, help="query heads, Llama's counting (default: 8)")
    parser.add_argument("--kv-heads", type=int, default=4, help="KV heads, Llama's counting, even (default: 4)")
    parser.add_argument("--head-dim", type=int, default=64, help="width d of one query/key head (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions, median reported (default: 5)")
    parser.add_argument("--decode-steps", type=int, default=50,
                        help="decode steps averaged inside one repetition (default: 50)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile every scheme with torch.profiler at the first T and append the tables")
    report.add_run_arguments(parser, "attention_kernels", "attention_kernels.md", quick="tiny, for the smoke test")
    args = report.parse_with_argv(parser, argv)
    if args.kv_heads % 2 or args.heads % args.kv_heads:
        parser.error("--kv-heads must be even (k1 and k2 per group) and divide --heads")
    if args.quick:
        args.seq_lens, args.cache_lens, args.repeats, args.decode_steps = [32, 64], [32], 1, 2
        args.threads = 1  # no OpenMP barriers: robust on a busy machine; quick numbers mean nothing
    return args


def main(argv=None) -> dict:
    """Check, time, (optionally) profile, then write the markdown, the PNG and the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = report.machine_info(args.threads)
    differences = check_equal(args)
    results = run(args)
    profile_text = profile_schemes(args.seq_lens[0], args) if args.profile else ""
    chart = plot(results, args.out.with_suffix(".png"), args)
    report.write_results(args.out, markdown(results, differences, info, args, profile_text),
                         {"settings": report.settings_of(args), "machine": info, "results": results,
                          "differences": differences, "chart": chart})
    return {"results": results, "differences": differences, "chart": chart}


if __name__ == "__main__":
    main()
