"""Long-prompt generation memory: peak RSS of `generate()` after an 8K-token prompt, against Llama's.

For each of Llama, transformers' DiffLlama, DiffTransformer V1 and V2 (the config numbers of the speed benchmark:
hidden 512, 8 query heads, 4 KV heads, 6 layers, vocab 8192, fp32, sdpa), a fresh
Python process builds the model, makes a `--prompt-len` prompt, resets its peak RSS (`VmHWM`, through
`/proc/self/clear_refs`) and runs `model.generate(prompt, max_new_tokens=--new-tokens)` (greedy, dynamic
cache). Reported: the increase of the peak RSS over the RSS with the model and prompt loaded (prefill
activations, the KV cache, logits), the absolute peak RSS, and their ratios to Llama. The processes run with
glibc's mmap threshold pinned (see `harness.memory.measure_in_subprocess`), are interleaved (llama, diffllama, v1, v2,
then again) and the median of `--repeats` is kept.

    python -m benchmarks.speed.memory_generate            # 8K prompt, about 5 minutes on 2 cores
    python -m benchmarks.speed.memory_generate --quick    # tiny settings for the smoke test
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from benchmarks.harness import report
from benchmarks.harness.memory import measure_in_subprocess
from benchmarks.harness.models import LABELS, MODEL_NAMES, add_model_arguments, config_numbers, tiny_model_arguments


def parse_args(argv=None):
    """Command-line flags (every one has --help text)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=8192, help="prompt tokens (default: 8192)")
    parser.add_argument("--new-tokens", type=int, default=4, help="greedy tokens generated (default: 4)")
    add_model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3,
                        help="fresh processes per model, the median is reported (default: 3)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes run at the same time; each has its own peak RSS, so this only changes the "
                        "wall time (default: 1; --quick uses 4)")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (default: sdpa)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES,
                        help="models to measure; llama is needed for the ratios (default: all four)")
    report.add_run_arguments(parser, "memory_generate", "memory_generate.md", quick="tiny, for the smoke test")
    args = report.parse_with_argv(parser, argv)
    if args.quick:
        tiny_model_arguments(args)
        args.prompt_len, args.new_tokens, args.repeats = 64, 2, 1
        args.jobs = max(args.jobs, 4)
    if "llama" not in args.models:
        parser.error("--models must include llama: every ratio is to Llama")
    return args


def main(argv=None) -> dict:
    """Measure every model in fresh processes, interleaved; write the markdown, the PNG and the JSON."""
    args = parse_args(argv)
    info = report.machine_info(args.threads)
    numbers = config_numbers(args, max_positions=args.prompt_len + args.new_tokens)
    raw = {name: [] for name in args.models}
    runs = [(repetition, name) for repetition in range(args.repeats) for name in args.models]
    specs = [dict(model=name, numbers=numbers, seq_len=args.prompt_len, new_tokens=args.new_tokens,
                  threads=args.threads, task="generate", attn_implementation=args.attn) for _, name in runs]
    # Peak RSS is per process, so parallel workers do not disturb each other's numbers (only the wall time).
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        measured = list(tqdm(pool.map(measure_in_subprocess, specs), total=len(specs), unit="proc",
                             desc=f"generate() after {args.prompt_len} tokens, fresh process each"))
    for (_, name), values in zip(runs, measured):
        raw[name].append(values)
    keys = ("peak_increase_mib", "peak_rss_mib", "rss_before_mib")
    results = {name: {key: statistics.median(run[key] for run in runs) for key in keys} for name, runs in raw.items()}
    base = results["llama"]
    lines = report.header(
        f"Long-prompt generation memory: {args.prompt_len}-token prompt, {args.new_tokens} new tokens",
        report.command("benchmarks.speed.memory_generate", args.argv), info,
        f"Models: {report.model_sizes(args)}; float32, attn_implementation=\"{args.attn}\", greedy `generate()` "
        "with the dynamic cache, batch 1",
        f"One fresh process per measurement, median of {args.repeats}, models interleaved. Peak = `VmHWM` after "
        "resetting it with the model and prompt loaded; glibc's mmap threshold pinned at 64 KiB "
        "(`MALLOC_MMAP_THRESHOLD_=65536`), so that freed tensors leave the RSS.",
    )
    lines += [
        "| model | peak RSS increase during generate() | ratio to Llama | absolute peak RSS | ratio to Llama |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in args.models:
        values = results[name]
        lines.append(
            f"| {LABELS[name]} | {values['peak_increase_mib']:.0f} MiB | "
            f"{values['peak_increase_mib'] / base['peak_increase_mib']:.3f}× | {values['peak_rss_mib']:.0f} MiB | "
            f"{values['peak_rss_mib'] / base['peak_rss_mib']:.3f}× |"
        )
    lines += ["", f"![peak RSS increase, ratio to Llama]({args.out.with_suffix('.png').name})", ""]
    increases = [results[name]["peak_increase_mib"] for name in args.models]
    chart = report.bar_chart(args.out.with_suffix(".png"), [LABELS[name] for name in args.models],
                             {"peak RSS increase (MiB)": increases}, "peak RSS increase during generate() (MiB)",
                             f"{args.prompt_len}-token prompt + {args.new_tokens} tokens, {args.layers} layers, fp32",
                             reference=None,
                             annotations=[f"{value / base['peak_increase_mib']:.2f}×" for value in increases])
    report.write_results(args.out, "\n".join(lines), {"settings": report.settings_of(args), "machine": info,
                                                      "results": results, "raw": raw, "chart": chart})
    return {"results": results, "raw": raw, "chart": chart}


if __name__ == "__main__":
    main()
