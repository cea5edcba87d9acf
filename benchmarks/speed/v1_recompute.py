"""What V1's training-time recomputation buys and costs: peak memory and step time, with it and without it.

In training, `DiffTransformerV1Attention` recomputes a1 - λ·a2 and the per-head norm in the backward pass
(`torch.utils.checkpoint` on those two elementwise steps) instead of keeping their outputs. This script measures
that choice against the plain autograd graph, on the speed benchmark's models and settings (hidden 512, 8 query /
4 KV heads, 6 layers, vocab 8192, fp32, sdpa, 2 threads):

- peak training memory: tensors allocated during one forward + backward (`harness.memory.peak_allocated_mib`);
- training-step time: forward + backward, Llama / V1 with recomputation / V1 without, interleaved, median of
  `--repeats`.

"Without" runs the very same model with the checkpoint call replaced by a direct call, so the two V1 columns
compute identical numbers and differ only in what autograd keeps. Writes
`benchmarks/results/v1_recompute/v1_recompute.md`.

    python -m benchmarks.speed.v1_recompute            # about 3 minutes on 2 cores
    python -m benchmarks.speed.v1_recompute --quick    # tiny settings, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import statistics

import torch

from benchmarks.harness import report
from benchmarks.harness.memory import peak_allocated_mib
from benchmarks.harness.models import (
    add_model_arguments,
    build_model,
    config_numbers,
    random_ids,
    tiny_model_arguments,
)
from benchmarks.harness.timing import time_interleaved, train_step_seconds

VARIANTS = ("llama", "v1-recompute", "v1-keep")
LABELS = {"llama": "Llama", "v1-recompute": "Diff V1, recompute (the model)", "v1-keep": "Diff V1, keep outputs"}


@contextlib.contextmanager
def recompute(enabled: bool):
    """Inside the block, V1 attention keeps (`enabled=False`) or recomputes its subtraction and norm outputs."""
    import modeling_diff.modeling_diff_transformer as modeling

    original = modeling.checkpoint
    if not enabled:
        modeling.checkpoint = lambda function, *args, **kwargs: function(*args)
    try:
        yield
    finally:
        modeling.checkpoint = original


def measure(variant: str, models: dict, ids: torch.Tensor, what) -> float:
    """`what(model, ids)` for one variant (the two V1 variants share one model)."""
    model = models["llama" if variant == "llama" else "diff-v1"]
    with recompute(variant != "v1-keep"):
        return what(model, ids)


def parse_args(argv=None):
    """Command-line flags (every one has --help text)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048],
                        help="sequence lengths T of the training step (default: 512 2048)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions, median reported (default: 5)")
    add_model_arguments(parser)
    report.add_run_arguments(parser, "v1_recompute", "v1_recompute.md", quick="tiny, for the smoke test")
    args = report.parse_with_argv(parser, argv)
    if args.quick:
        tiny_model_arguments(args)
        args.seq_lens, args.repeats = [32], 1
    return args


def main(argv=None) -> dict:
    """Measure both V1 variants against Llama; write and return the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = report.machine_info(args.threads)
    numbers = config_numbers(args, max_positions=max(args.seq_lens))
    models = {name: build_model(name, numbers) for name in ("llama", "diff-v1")}
    results = {}
    for seq_len in args.seq_lens:
        ids = random_ids(args.vocab, seq_len, seed=seq_len)
        memory = {variant: measure(variant, models, ids, peak_allocated_mib) for variant in VARIANTS}
        times = time_interleaved({variant: variant for variant in VARIANTS},
                                 [("step", lambda variant: measure(variant, models, ids, train_step_seconds))],
                                 args.repeats)
        results[seq_len] = {"memory_mib": memory,
                            "step_seconds": {v: statistics.median(t["step"]) for v, t in times.items()}}

    lines = report.header(
        "V1 in training: recompute the subtraction and the head norm, or keep their outputs",
        report.command("benchmarks.speed.v1_recompute", args.argv), info,
        f"Models: {report.model_sizes(args)}; float32, sdpa, batch 1; step times are the median of {args.repeats}, "
        "variants interleaved",
    )
    lines += [
        "Each cell: ratio to Llama · absolute value.",
        "",
        "| measure | " + " | ".join(LABELS[v] for v in VARIANTS) + " |",
        "| --- | " + " | ".join("---" for _ in VARIANTS) + " |",
    ]
    for seq_len, result in results.items():
        for key, label, unit in (("memory_mib", "peak training memory (allocated tensors)", "MiB"),
                                 ("step_seconds", "training step fwd+bwd", "s")):
            values = result[key]
            cells = [f"{values[v] / values['llama']:.3f}× · {report.fmt(values[v], unit)}" for v in VARIANTS]
            lines.append(f"| {label}, T={seq_len} | " + " | ".join(cells) + " |")
    report.write_results(args.out, "\n".join(lines))
    return results


if __name__ == "__main__":
    main()
