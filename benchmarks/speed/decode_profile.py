"""Where a decoding step's time goes: the operators each model runs per token, from torch.profiler.

`benchmarks.speed.speed` reports decode tokens/s; this script explains the ratios. It builds Llama and
DiffTransformer V1 / V2 with the speed benchmark's config numbers (by default hidden 512, 8 query / 4 KV heads,
6 layers, vocab 8192, fp32, sdpa, 2 threads), prefills a `--prompt-len` prompt, then:

1. times `--steps` greedy one-token forwards per model with the `DynamicCache`, models interleaved, median of
   `--repeats` (the same measure as the speed benchmark's "decode tok/s (model loop)");
2. profiles `--steps` more one-token forwards per model and counts, per generated token, how many times each
   aten operator ran and its self CPU time.

The table lists the operators whose per-token count differs between Llama and a Diff model, the difference in
calls and in self time, and the totals. At this size a decoding step is a chain of small kernels, so a per-token
difference in the number of operators shows up directly in tokens/s. The profiler adds its own cost to every
operator, so its times are larger than in the unprofiled run: read them as shares, not as absolute figures.

    python -m benchmarks.speed.decode_profile            # about a minute on 2 cores
    python -m benchmarks.speed.decode_profile --threads 1 --clock cpu --repeats 21   # the latest results file
    python -m benchmarks.speed.decode_profile --before 2df2ff1   # and the Diff models of that commit, same weights
    python -m benchmarks.speed.decode_profile --quick    # tiny settings, for the smoke test

`--before REV` adds V1 and V2 built by the modeling code of git revision REV (`harness.models.modeling_at`) with the
same weights, timed and profiled in the same interleaved run: a change's effect on operators and tok/s, measured
before and after at once.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from tqdm.auto import tqdm

from benchmarks.harness import report
from benchmarks.harness.models import (
    LABELS,
    add_model_arguments,
    build_model,
    config_numbers,
    random_ids,
    tiny_model_arguments,
)
from benchmarks.harness.timing import CLOCK_HELP, CLOCKS, decode_seconds, prefill, time_interleaved

LABELS = dict(LABELS)  # the --before models get their own labels below

MODELS = ("llama", "diff-v1", "diff-v2")


@torch.inference_mode()
def operators_per_token(model, prompt: torch.Tensor, steps: int) -> dict[str, tuple[float, float]]:
    """{aten operator: (calls per token, self CPU µs per token)} over `steps` profiled one-token forwards."""
    from torch.profiler import ProfilerActivity, profile

    cache, token = prefill(model, prompt)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    return {
        event.key: (event.count / steps, event.self_cpu_time_total / steps)
        for event in prof.key_averages()
        if event.key.startswith("aten::")
    }


def difference_table(ops: dict, name: str, layers: int, base_name: str = "llama") -> list[str]:
    """Markdown rows of the operators whose per-token call count differs between `base_name` and `name`."""
    base, other = ops[base_name], ops[name]
    rows = []
    for key in sorted(set(base) | set(other)):
        calls_base, time_base = base.get(key, (0.0, 0.0))
        calls_other, time_other = other.get(key, (0.0, 0.0))
        if abs(calls_other - calls_base) > 1e-9:
            rows.append((time_other - time_base, key, calls_base, calls_other))
    rows.sort(reverse=True)
    lines = [
        f"| operator | {LABELS[base_name]} calls/token | {LABELS[name]} calls/token | extra calls per layer | "
        "extra self µs/token |",
        "| --- | --- | --- | --- | --- |",
    ]
    for delta, key, calls_base, calls_other in rows:
        lines.append(
            f"| `{key}` | {calls_base:g} | {calls_other:g} | {(calls_other - calls_base) / layers:+g} | {delta:+.0f} |"
        )
    return lines


def parse_args(argv=None):
    """Command-line flags (every one has --help text)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens before decoding (default: 512)")
    parser.add_argument("--steps", type=int, default=64, help="one-token forwards timed / profiled (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions, median reported (default: 5)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help=CLOCK_HELP + " (default: wall)")
    parser.add_argument("--before", metavar="REV", default=None,
                        help="also time and profile V1 and V2 built by the modeling code of this git revision")
    report.add_run_arguments(parser, "decode_profile", "decode_profile.md", quick="tiny, for the smoke test")
    args = report.parse_with_argv(parser, argv)
    if args.quick:  # 16-token prompt, 4 steps, 1 repetition, tiny models
        args.prompt_len, args.steps, args.repeats = 16, 4, 1
        tiny_model_arguments(args)
    return args


def main(argv=None) -> dict:
    """Time and profile the decoding step of each model; write and return the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = report.machine_info(args.threads)
    numbers = config_numbers(args, max_positions=args.prompt_len + args.steps + 2)
    models = {name: build_model(name, numbers) for name in MODELS}
    diff_models = [name for name in MODELS if name != "llama"]
    if args.before:
        for name in diff_models:
            before = f"{name}@{args.before}"
            LABELS[before] = f"{LABELS[name]} ({args.before})"
            models[before] = build_model(name, numbers, revision=args.before)
            models[before].load_state_dict(models[name].state_dict())
    prompt = random_ids(args.vocab, args.prompt_len, seed=7)

    clock = CLOCKS[args.clock]
    timings = time_interleaved(
        models, [("decode", lambda m: decode_seconds(m, prompt, args.steps, clock)[0] / args.steps)], args.repeats)
    per_token = {name: statistics.median(values["decode"]) for name, values in timings.items()}
    ops = {name: operators_per_token(model, prompt, args.steps)
           for name, model in tqdm(models.items(), desc="profiling")}

    lines = report.header(
        "Decoding step: operators per generated token",
        report.command("benchmarks.speed.decode_profile", args.argv), info,
        f"Models: {report.model_sizes(args)}; float32, sdpa, batch 1, DynamicCache, {args.prompt_len}-token prompt, "
        f"{args.steps} one-token forwards",
    )
    lines += [
        f"| model | ms per token ({args.clock} clock, unprofiled, median of {args.repeats}) | tok/s ratio to Llama | "
        "aten operators per token | profiled self CPU ms per token |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in models:
        calls = sum(count for count, _ in ops[name].values())
        self_ms = sum(us for _, us in ops[name].values()) / 1e3
        lines.append(f"| {LABELS[name]} | {per_token[name] * 1e3:.3f} | {per_token['llama'] / per_token[name]:.3f}× | "
                     f"{calls:.0f} | {self_ms:.2f} |")
    for name in diff_models:
        lines += ["", f"## {LABELS[name]} against Llama: operators whose count differs", ""]
        lines += difference_table(ops, name, args.layers)
    if args.before:
        for name in diff_models:
            before = f"{name}@{args.before}"
            lines += ["", f"## {LABELS[name]} now against {LABELS[before]}: operators whose count differs", ""]
            lines += difference_table(ops, name, args.layers, base_name=before)
    report.write_results(args.out, "\n".join(lines))
    return {"per_token_seconds": per_token, "ops": ops}


if __name__ == "__main__":
    main()
