"""Speed and memory of DiffTransformer V1 / V2 against Llama and transformers' DiffLlama, side by side.

The four models of `benchmarks.harness.models`, built from the same config numbers (by default hidden 512, 8 query
heads, 4 KV heads, 6 layers, vocab 8192, intermediate 1376, fp32, `attn_implementation="sdpa"`). Measured,
interleaving the models inside every repetition and reporting the median of `--repeats` after one untimed warm-up
per model and measure:

- training step: forward + backward of the LM loss at each T of `--seq-lens` (batch 1), no optimizer;
- prefill latency: one `use_cache=True` forward of T tokens under `torch.inference_mode()`;
- decode tokens/s: a `--prompt-len` prefill, then `--new-tokens` greedy one-token forwards with the
  `DynamicCache` (only the one-token forwards are timed: this is the model's decode speed without
  `generate()`'s bookkeeping), and, separately, `model.generate(...)` end to end (prefill included);
- peak training memory: the peak of the bytes held by live tensors during one forward + backward
  (`peak_allocated_mib`), and, in a fresh subprocess per (model, T), the increase of the process's peak RSS over
  its RSS with the model and the inputs loaded, and the absolute peak RSS;
- KV-cache bytes: the bytes of all key and value tensors in the cache after the `--prompt-len` prefill.

Writes a markdown table (absolute values and ratios to Llama) with the targets checked PASS / MISS, a PNG chart
(whose plotted ratios are also in the JSON) and a JSON file with every raw repetition. The GPU figures come from
`benchmarks.gpu.gpu_check`.

    python -m benchmarks.speed.speed                 # the full CPU run (about 10 minutes on 2 cores)
    python -m benchmarks.speed.speed --quick         # tiny settings, seconds; what the smoke test runs
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.harness.memory import measure_in_subprocess, peak_allocated_mib
from benchmarks.harness.models import (
    LABELS,
    MODEL_NAMES,
    add_model_arguments,
    build_model,
    config_numbers,
    parameter_count,
    random_ids,
    tiny_model_arguments,
)
from benchmarks.harness.report import (
    add_run_arguments,
    bar_chart,
    command,
    fmt,
    header,
    machine_info,
    model_sizes,
    parse_with_argv,
    settings_of,
    write_results,
)
from benchmarks.harness.timing import (
    CLOCK_HELP,
    CLOCKS,
    decode_seconds,
    generate_seconds,
    median,
    prefill_seconds,
    time_interleaved,
    train_step_seconds,
)

# the targets, as ratios to Llama in the same run
V1_TRAIN_BOUNDS = {512: 1.08, 2048: 1.15}
V2_TRAIN_BOUND, DECODE_BOUND, MEMORY_BOUND = 1.05, 0.95, 1.15


def build_rows(results: dict, args) -> list[dict]:
    """Rows of the results table: a key, a label, a unit, and per-model medians."""
    rows = [dict(key=f"train_{t}", label=f"training step fwd+bwd, T={t}", unit="s") for t in args.seq_lens]
    rows += [dict(key=f"prefill_{t}", label=f"prefill latency, T={t}", unit="s") for t in args.seq_lens]
    rows.append(dict(key="decode_tps", label=f"decode tok/s (model loop, {args.prompt_len}+{args.new_tokens})",
                     unit="tok/s"))
    rows.append(dict(key="generate_tps", label=f"generate() tok/s ({args.prompt_len}+{args.new_tokens}, "
                     "prefill incl.)", unit="tok/s"))
    rows += [dict(key=f"alloc_{t}", label=f"peak training memory (allocated tensors), T={t}", unit="MiB")
             for t in args.memory_seq_lens]
    for t in args.memory_seq_lens:
        rows.append(dict(key=f"mem_{t}", label=f"peak training RSS increase, T={t}", unit="MiB"))
        rows.append(dict(key=f"memabs_{t}", label=f"peak RSS of the process (absolute), T={t}", unit="MiB"))
    rows.append(dict(key="kv_bytes", label=f"KV-cache bytes after {args.prompt_len} tokens", unit="B"))
    rows.append(dict(key="params", label="parameters", unit="M"))
    for row in rows:
        row["values"] = {name: values[row["key"]] for name, values in results.items() if row["key"] in values}
    return [row for row in rows if row["values"]]


def check_targets(rows: list[dict], args) -> list[dict]:
    """The targets, as ratios to Llama in this run: a list of {target, measured, verdict}."""
    by_key = {row["key"]: row["values"] for row in rows}
    wanted = [(f"V1 training step ≤ {bound}× at T={t}", f"train_{t}", "diff-v1", bound, "<=")
              for t, bound in sorted(V1_TRAIN_BOUNDS.items(), reverse=True)]
    wanted += [(f"V2 training step ≤ {V2_TRAIN_BOUND}× at T={t}", f"train_{t}", "diff-v2", V2_TRAIN_BOUND, "<=")
               for t in args.seq_lens]
    for name in ("diff-v1", "diff-v2"):
        wanted.append((f"{LABELS[name]} decode tok/s ≥ {DECODE_BOUND}×", "decode_tps", name, DECODE_BOUND, ">="))
    for name in ("diff-v1", "diff-v2"):
        wanted.append((f"{LABELS[name]} KV-cache bytes = Llama's", "kv_bytes", name, 1.0, "=="))
    for t in args.memory_seq_lens:
        for name in ("diff-v1", "diff-v2"):
            wanted.append((f"{LABELS[name]} peak training memory ≤ {MEMORY_BOUND}× at T={t}", f"alloc_{t}", name,
                           MEMORY_BOUND, "<="))
    checks = []
    for target, key, name, bound, kind in wanted:
        values = by_key.get(key, {})
        if name not in values or "llama" not in values:
            continue
        ratio = values[name] / values["llama"]
        ok = ratio <= bound if kind == "<=" else (ratio >= bound if kind == ">=" else abs(ratio - 1) < 1e-12)
        checks.append(dict(target=target, measured=f"{ratio:.3f}×", verdict="PASS" if ok else "MISS"))
    return checks


def markdown(rows, checks, info, args) -> str:
    """The results file: settings, machine, the ratio table, the targets."""
    names = list(args.models) + [name for name in LABELS if name.endswith(f"@{args.before}")]
    lines = header(
        "Speed and memory: Llama vs DiffLlama vs DiffTransformer V1 / V2",
        command("benchmarks.speed.speed", args.argv), info,
        f"Models: {model_sizes(args)}; {args.dtype}, attn_implementation=\"{args.attn}\", batch 1",
        f"Timing: median of {args.repeats} repetitions after one warm-up, models interleaved inside each "
        f"repetition, {args.clock} clock",
    )
    lines += [
        "Each cell is the ratio to Llama, then the absolute median. For times and memory lower is better, for "
        "tok/s higher is better.",
        "",
        "| measure | " + " | ".join(LABELS[name] for name in names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for row in rows:
        base = row["values"].get("llama")
        cells = []
        for name in names:
            if name not in row["values"]:
                cells.append("n/a")
                continue
            value = row["values"][name]
            ratio = value / base if base else None
            prefix = "" if ratio is None else (f"{ratio:.3f}× · " if ratio >= 0.01 else f"{ratio:.3g}× · ")
            cells.append(prefix + fmt(value, row["unit"]))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets, ratios to Llama in this run", "", "| target | measured | verdict |",
              "| --- | --- | --- |"]
    lines += [f"| {c['target']} | {c['measured']} | {c['verdict']} |" for c in checks]
    lines += ["", f"![ratios to Llama]({args.out.with_suffix('.png').name})", ""]
    return "\n".join(lines)


def plot(rows, path: Path, args) -> dict:
    """Grouped bars of the ratio to Llama per measure (1.0 = Llama); returns the plotted ratios."""
    rows = [row for row in rows if row["key"] != "params" and not row["key"].startswith("memabs")]
    others = [name for name in args.models if name != "llama"]
    series = {LABELS[name]: [row["values"][name] / row["values"]["llama"] if name in row["values"] else None
                             for row in rows] for name in others}
    return bar_chart(path, [row["label"].replace(", ", "\n", 1) for row in rows], series,
                     "ratio to Llama (time/memory: lower is better; tok/s: higher)",
                     f"{args.layers} layers, hidden {args.hidden}, {args.dtype}, {args.attn}, {args.threads} threads")


def parse_args(argv=None):
    """Command-line flags (every one has --help text)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 4096],
                        help="sequence lengths T of the training step and prefill measures (default: 512 2048 4096)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repetitions per model and measure, the median is reported (default: 3)")
    add_model_arguments(parser)
    parser.add_argument("--max-positions", type=int, default=4096,
                        help="max_position_embeddings floor (default: 4096)")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens before decoding (default: 512)")
    parser.add_argument("--new-tokens", type=int, default=128, help="greedy tokens to decode (default: 128)")
    parser.add_argument("--memory-seq-lens", type=int, nargs="*", default=None,
                        help="T values of the peak-memory measures: tensors allocated during a training step "
                        "(in this process) and the process RSS (one fresh subprocess per model and T) "
                        "(default: the --seq-lens; pass nothing after the flag to skip memory)")
    parser.add_argument("--memory-jobs", type=int, default=1,
                        help="memory subprocesses run at the same time; each has its own peak RSS, so this only "
                        "changes the wall time (default: 1; --quick uses 4)")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation of every model (default: sdpa)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="parameter/activation dtype (default: float32)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES,
                        help="which models to run; llama is needed for the ratios (default: all four)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help=CLOCK_HELP + " (default: wall)")
    parser.add_argument("--before", metavar="REV", default=None,
                        help="also measure V1 and V2 built by the modeling code of this git revision (same weights), "
                        "in the same interleaved run")
    add_run_arguments(parser, "speed", "speed.md", quick="tiny models, T 32 and 64, 1 thread: the smoke test")
    args = parse_with_argv(parser, argv)
    if "llama" not in args.models:
        parser.error("--models must include llama: every ratio is to Llama")
    if args.quick:
        tiny_model_arguments(args)
        args.max_positions, args.seq_lens, args.prompt_len, args.new_tokens, args.repeats = 128, [32, 64], 16, 8, 1
        args.memory_jobs = max(args.memory_jobs, 4)
        if args.memory_seq_lens is None:
            args.memory_seq_lens = [32]
    if args.memory_seq_lens is None:
        args.memory_seq_lens = list(args.seq_lens)
    return args


def main(argv=None) -> dict:
    """Run every measure, interleaved; write the markdown, PNG and JSON; return the results, rows and targets."""
    args = parse_args(argv)
    if args.dtype != "float32":
        print(f"note: {args.dtype} on CPU is measured as asked; the reference table is float32.")
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    dtype = getattr(torch, args.dtype)
    max_positions = max(max(args.seq_lens), args.prompt_len + args.new_tokens, args.max_positions)
    numbers = config_numbers(args, max_positions)
    models = {name: build_model(name, numbers, args.attn, dtype) for name in args.models}
    for name in [name for name in args.models if name.startswith("diff-")] if args.before else []:
        before = f"{name}@{args.before}"  # timed and measured in process; not in the RSS subprocesses or the chart
        LABELS[before] = f"{LABELS[name]} ({args.before})"
        models[before] = build_model(name, numbers, args.attn, dtype, revision=args.before)
        models[before].load_state_dict(models[name].state_dict())
    results = {name: {"params": float(parameter_count(model))} for name, model in models.items()}
    ids = {t: random_ids(args.vocab, t, seed=t) for t in args.seq_lens}
    prompt = random_ids(args.vocab, args.prompt_len, seed=7)

    clock = CLOCKS[args.clock]
    measures = []
    for t in args.seq_lens:
        measures.append((f"train_{t}", lambda m, t=t: train_step_seconds(m, ids[t], clock)))
        measures.append((f"prefill_{t}", lambda m, t=t: prefill_seconds(m, ids[t], clock)))
    measures.append(("decode", lambda m: decode_seconds(m, prompt, args.new_tokens, clock)))
    measures.append(("generate", lambda m: generate_seconds(m, prompt, args.new_tokens, clock)))
    raw = time_interleaved(models, measures, args.repeats)
    for name in models:
        for key, values in raw[name].items():
            if key == "decode":
                results[name]["decode_tps"] = args.new_tokens / median([v[0] for v in values])
                results[name]["kv_bytes"] = float(values[0][1])
            elif key == "generate":
                results[name]["generate_tps"] = args.new_tokens / median(values)
            else:
                results[name][key] = median(values)

    for t in tqdm(args.memory_seq_lens, desc="peak allocated memory", unit="T"):
        memory_ids = random_ids(args.vocab, t, seed=t)
        for name, model in models.items():
            results[name][f"alloc_{t}"] = peak_allocated_mib(model, memory_ids)
    del models
    memory_runs = [(t, name) for t in args.memory_seq_lens for name in args.models]
    specs = [dict(model=name, numbers=numbers, seq_len=t, threads=args.threads, task="train",
                  attn_implementation=args.attn) for t, name in memory_runs]
    # Peak RSS is per process, so parallel workers do not disturb each other's numbers (only the wall time).
    with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
        measured_all = list(tqdm(pool.map(measure_in_subprocess, specs), total=len(specs),
                                 desc="peak memory (fresh subprocess each)", unit="proc"))
    for (t, name), measured in zip(memory_runs, measured_all):
        results[name][f"mem_{t}"] = measured["peak_increase_mib"]
        results[name][f"memabs_{t}"] = measured["peak_rss_mib"]
        raw[name][f"mem_{t}"] = measured

    rows = build_rows(results, args)
    checks = check_targets(rows, args)
    chart = plot(rows, args.out.with_suffix(".png"), args)
    write_results(args.out, markdown(rows, checks, info, args),
                  {"settings": settings_of(args), "machine": info, "results": results, "raw": raw, "targets": checks,
                   "chart": chart})
    return {"results": results, "rows": rows, "targets": checks, "chart": chart}


if __name__ == "__main__":
    main()
