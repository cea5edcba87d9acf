#!/usr/bin/env python
"""Long-prompt generation memory: peak RSS of `generate()` after an 8K-token prompt, against Llama's.

For each of Llama, transformers' DiffLlama, DiffTransformer V1 and V2 (the config numbers of
`benchmarks/speed.py`: hidden 512, 8 query heads, 4 KV heads, 6 layers, vocab 8192, fp32, sdpa), a fresh
Python process builds the model, makes a `--prompt-len` prompt, resets its peak RSS (`VmHWM`, through
`/proc/self/clear_refs`) and runs `model.generate(prompt, max_new_tokens=--new-tokens)` (greedy, dynamic
cache). Reported: the increase of the peak RSS over the RSS with the model and prompt loaded (prefill
activations, the KV cache, logits), the absolute peak RSS, and their ratios to Llama. The processes run with
glibc's mmap threshold pinned (see `speed.measure_in_subprocess`), are interleaved (llama, diffllama, v1, v2,
then again) and the median of `--repeats` is kept.

    python benchmarks/memory_generate.py            # 8K prompt, about 5 minutes on 2 cores
    python benchmarks/memory_generate.py --quick    # tiny settings for the smoke test
"""

from __future__ import annotations

import argparse
import statistics
from concurrent.futures import ThreadPoolExecutor
import sys
from pathlib import Path

from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from speed import LABELS, MODEL_NAMES, add_model_arguments, machine_info, measure_in_subprocess  # noqa: E402


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
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (hidden 64, 2 layers, 64-token prompt, 1 repetition, 1 thread) for the smoke test")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory_generate.md",
                        help="markdown results file; the PNG goes next to it "
                        "(default: benchmarks/results/memory_generate.md)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab = 64, 2, 176, 256
        args.prompt_len, args.new_tokens, args.repeats = 64, 2, 1
        args.threads = 1  # no OpenMP barriers: robust on a busy machine; quick numbers mean nothing
        args.jobs = max(args.jobs, 4)
    if "llama" not in args.models:
        parser.error("--models must include llama: every ratio is to Llama")
    return args


def numbers_for(args) -> dict:
    """The shared config numbers (as in speed.py), with room for the prompt and the new tokens."""
    return dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt_len + args.new_tokens, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def main(argv=None) -> dict:
    """Measure every model in fresh processes, interleaved; write the markdown and the PNG."""
    args = parse_args(argv)
    numbers = numbers_for(args)
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
    results = {
        name: {key: statistics.median(run[key] for run in runs_) for key in ("peak_increase_mib", "peak_rss_mib",
                                                                               "rss_before_mib")}
        for name, runs_ in raw.items()
    }
    info = machine_info(args.threads)
    base = results["llama"]
    lines = [
        f"# Long-prompt generation memory: {args.prompt_len}-token prompt, {args.new_tokens} new tokens",
        "",
        f"Produced by `python benchmarks/memory_generate.py {' '.join(args.argv)}`".rstrip()
        + f" on {info['date_utc']}.",
        "",
        f"- Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch threads = {args.threads}",
        f"- Versions: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}",
        f"- Models: hidden {args.hidden}, {args.heads} query heads, {args.kv_heads} KV heads, {args.layers} layers, "
        f"vocab {args.vocab}, intermediate {args.intermediate}; float32, attn_implementation=\"{args.attn}\", "
        "greedy `generate()` with the dynamic cache, batch 1",
        f"- One fresh process per measurement, median of {args.repeats}, models interleaved. Peak = `VmHWM` after "
        "resetting it with the model and prompt loaded; glibc's mmap threshold pinned at 64 KiB "
        "(`MALLOC_MMAP_THRESHOLD_=65536`), so that freed tensors leave the RSS.",
        "",
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
    lines += ["", "![peak RSS increase, ratio to Llama](memory_generate.png)", ""]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plot(results, args.out.with_suffix(".png"), args)
    return {"results": results, "raw": raw}


def plot(results, path: Path, args) -> None:
    """Bars of the peak RSS increase per model (MiB), annotated with the ratio to Llama."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    values = [results[name]["peak_increase_mib"] for name in names]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar([LABELS[name] for name in names], values, color=["gray", "tab:blue", "tab:orange", "tab:green"])
    for bar, value in zip(bars, values):
        ax.annotate(f"{value / results['llama']['peak_increase_mib']:.2f}×", (bar.get_x() + bar.get_width() / 2, value),
                    ha="center", va="bottom")
    ax.set_ylabel("peak RSS increase during generate() (MiB)")
    ax.set_title(f"{args.prompt_len}-token prompt + {args.new_tokens} tokens, {args.layers} layers, fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
