#!/usr/bin/env python
"""Speed and memory of DiffTransformer V1 / V2 against Llama and transformers' DiffLlama, side by side.

Four causal LMs are built from the same config numbers (by default hidden 512, 8 query heads, 4 KV heads,
6 layers, vocab 8192, intermediate 1376, fp32, `attn_implementation="sdpa"`):

    llama       transformers.LlamaForCausalLM
    diffllama   transformers.DiffLlamaForCausalLM
    diff-v1     modeling_diff.DiffTransformerForCausalLM, diff_version=1 (the paper)
    diff-v2     modeling_diff.DiffTransformerForCausalLM, diff_version=2 (DIFF V2)

Heads are counted the same way in all four (query heads = softmax maps, `head_dim`-wide KV heads), so the
numbers compare directly. Measured, interleaving the models inside every repetition (llama, diffllama, v1,
v2, llama, ...) and reporting the median of `--repeats` after one untimed warm-up per model and measure:

- training step: forward + backward of the LM loss at each T of `--seq-lens` (batch 1), no optimizer;
- prefill latency: one `use_cache=True` forward of T tokens under `torch.inference_mode()`;
- decode tokens/s: a `--prompt-len` prefill, then `--new-tokens` greedy one-token forwards with the
  `DynamicCache` (only the one-token forwards are timed: this is the model's decode speed without
  `generate()`'s bookkeeping), and, separately, `model.generate(...)` end to end (prefill included);
- peak training memory: in a fresh subprocess per (model, T), the increase of the process's peak RSS
  (`VmHWM`, reset through `/proc/self/clear_refs` just before the step) over its RSS with the model and the
  inputs loaded, during one forward + backward. That is activations, gradients and allocator slack, the part
  the attention implementation can change; the absolute peak RSS is reported too;
- KV-cache bytes: the bytes of all key and value tensors in the cache after the `--prompt-len` prefill.

The output is a markdown table (absolute values and ratios to Llama), printed and written with the machine
and library versions to `--out` (default `benchmarks/results/speed.md`), a PNG chart next to it, and a
JSON file with every raw repetition. The targets of issue 6 are checked and reported PASS / MISS.

The GPU part of the issue (bf16, flash_attention_2, compiled static-cache decode) runs with `--device cuda`
when CUDA is present; without CUDA that flag stops with a clear message and nothing is measured.

    python benchmarks/speed.py                 # the full CPU run (about 10 minutes on 2 cores)
    python benchmarks/speed.py --quick         # tiny settings, seconds; used by the smoke test
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
MODEL_NAMES = ("llama", "diffllama", "diff-v1", "diff-v2")
LABELS = {"llama": "Llama", "diffllama": "DiffLlama", "diff-v1": "Diff V1", "diff-v2": "Diff V2"}


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def config_numbers(args) -> dict:
    """The config numbers shared by all four models (Llama's head counting)."""
    return dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(max(args.seq_lens), args.prompt_len + args.new_tokens, args.max_positions),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def modeling_at(revision: str):
    """The modeling module of `modeling_diff` as it was at git `revision`, imported under another name.

    For before/after measurements in one interleaved run: the two model files of that commit are copied into a
    temporary package, so the old and the current classes can live side by side in one process.
    """
    name = "modeling_diff_at_" + re.sub(r"\W", "_", revision)
    if name not in sys.modules:
        folder = Path(tempfile.mkdtemp(prefix="modeling_diff_at_")) / name
        folder.mkdir()
        atexit.register(shutil.rmtree, folder.parent, True)
        for file in ("configuration_diff_transformer.py", "modeling_diff_transformer.py"):
            shown = subprocess.run(
                ["git", "-C", str(HERE.parent), "show", f"{revision}:modeling_diff/{file}"],
                capture_output=True, text=True, check=False,
            )
            if shown.returncode != 0:
                raise SystemExit(f"error: cannot read modeling_diff/{file} at git revision {revision!r}")
            (folder / file).write_text(shown.stdout)
        (folder / "__init__.py").write_text("")
        sys.path.insert(0, str(folder.parent))
    return importlib.import_module(name + ".modeling_diff_transformer")


def build_model(
    name: str, numbers: dict, attn_implementation: str = "sdpa", dtype=torch.float32, seed: int = 0, revision=None
):
    """Build one of `MODEL_NAMES` from `numbers`, randomly initialised with `seed`, in eval mode.

    With `revision`, a DiffTransformer is built from the modeling code of that git revision (`modeling_at`).
    """
    import modeling_diff  # noqa: F401  (registers the Auto classes)
    from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM
    from transformers import DiffLlamaConfig, DiffLlamaForCausalLM, LlamaConfig, LlamaForCausalLM

    if revision is not None:  # the same names, from the old file
        old = modeling_at(revision)
        DiffTransformerConfig, DiffTransformerForCausalLM = old.DiffTransformerConfig, old.DiffTransformerForCausalLM

    torch.manual_seed(seed)
    if name == "llama":
        config, cls = LlamaConfig(**numbers), LlamaForCausalLM
    elif name == "diffllama":
        config, cls = DiffLlamaConfig(**numbers), DiffLlamaForCausalLM
    elif name in ("diff-v1", "diff-v2"):
        config, cls = DiffTransformerConfig(diff_version=int(name[-1]), **numbers), DiffTransformerForCausalLM
    else:
        raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")
    config._attn_implementation = attn_implementation
    model = cls(config).to(dtype=dtype)
    return model.eval()


def cache_bytes(cache) -> int:
    """Bytes held by every key and value tensor of a transformers cache."""
    total = 0
    for layer in cache.layers:
        for tensor in (layer.keys, layer.values):
            if tensor is not None and tensor.numel():
                total += tensor.numel() * tensor.element_size()
    return total


# ----------------------------------------------------------------------------------------------------------------
# Measures (each returns seconds, or a number of bytes)
# ----------------------------------------------------------------------------------------------------------------


def random_ids(vocab: int, length: int, seed: int) -> torch.Tensor:
    """A (1, length) batch of token ids, the same for every model."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, length), generator=generator)


def train_step_seconds(model, ids: torch.Tensor, clock=time.perf_counter) -> float:
    """Seconds for one forward + backward of the LM loss (gradients are dropped afterwards), read on `clock`."""
    model.train()
    model.zero_grad(set_to_none=True)
    start = clock()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    elapsed = clock() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return elapsed


@torch.inference_mode()
def prefill_seconds(model, ids: torch.Tensor, clock=time.perf_counter) -> float:
    """Seconds for one cached forward of the whole prompt (what `generate()` does first), read on `clock`."""
    start = clock()
    model(input_ids=ids, use_cache=True)
    return clock() - start


@torch.inference_mode()
def decode_seconds(model, ids: torch.Tensor, new_tokens: int, clock=time.perf_counter) -> tuple[float, int]:
    """Prefill `ids` (untimed), then time `new_tokens` greedy one-token forwards on the cache, on `clock`.

    Returns the seconds of the decode loop and the cache's bytes right after the prefill.
    """
    out = model(input_ids=ids, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    kv_bytes = cache_bytes(cache)
    next_id = out.logits[:, -1:].argmax(-1)
    start = clock()
    for _ in range(new_tokens):
        out = model(input_ids=next_id, cache=cache, use_cache=True)
        next_id = out.logits[:, -1:].argmax(-1)
    return clock() - start, kv_bytes


@torch.inference_mode()
def generate_seconds(model, ids: torch.Tensor, new_tokens: int, clock=time.perf_counter) -> float:
    """Seconds (on `clock`) for `model.generate` (greedy, prefill included) producing exactly `new_tokens` tokens."""
    start = clock()
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0,
    )
    return clock() - start


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_HELP = (
    "wall: elapsed time; cpu: this process's CPU time, which leaves out the time other jobs on a shared machine hold "
    "the core (use it with 1 thread)"
)


def time_interleaved(models: dict, measures: list, repeats: int, warmup: bool = True) -> dict:
    """Run every measure on every model, interleaved; returns {model: {key: [value per repetition]}}.

    `measures` holds (key, callable(model) -> value) pairs, or (key, callable, model names) to run a measure on
    some models only. Inside each repetition every model runs once, the order alternating forwards and backwards
    between repetitions; with `warmup`, repetition 0 is run first and not recorded.
    """
    raw = {name: {} for name in models}
    first = 0 if warmup else 1
    plan = [(m[0], m[1], m[2] if len(m) > 2 else list(models)) for m in measures]
    total = sum(len(names) for _, _, names in plan) * (repeats + 1 - first)
    with tqdm(total=total, desc="timing (models interleaved)", unit="run") as bar:
        for key, measure, names in plan:
            for repetition in range(first, repeats + 1):  # repetition 0 is the warm-up
                for name in names if repetition % 2 == 0 else names[::-1]:
                    bar.set_postfix_str(f"{key} {name}")
                    value = measure(models[name])
                    if repetition > 0:
                        raw[name].setdefault(key, []).append(value)
                    bar.update()
    return raw


# ----------------------------------------------------------------------------------------------------------------
# Peak RSS, one fresh subprocess per measurement
# ----------------------------------------------------------------------------------------------------------------


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


def _status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status (Linux only)")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def memory_worker(spec: dict) -> dict:
    """Runs inside a fresh subprocess: build one model and measure the peak RSS of one task.

    `spec["task"]` is `"train"` (one forward + backward at `seq_len`) or `"generate"` (`model.generate` of
    `new_tokens` tokens after a `seq_len` prompt). Returns MiB: RSS before, absolute peak, and the increase.
    """
    torch.set_num_threads(spec["threads"])
    model = build_model(spec["model"], spec["numbers"], spec.get("attn_implementation", "sdpa"))
    ids = random_ids(spec["numbers"]["vocab_size"], spec["seq_len"], seed=1)
    before = _status_kib("VmRSS")
    reset_ok = reset_peak_rss()
    if spec["task"] == "train":
        train_step_seconds(model, ids)
    elif spec["task"] == "generate":
        generate_seconds(model, ids, spec["new_tokens"])
    else:
        raise ValueError(spec["task"])
    peak = _status_kib("VmHWM")
    return {
        "rss_before_mib": before / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_increase_mib": (peak - before) / 1024,
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
        [sys.executable, str(HERE / "speed.py"), "--memory-worker", json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=3600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory worker failed for {spec}:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# Environment and reporting
# ----------------------------------------------------------------------------------------------------------------


def machine_info(threads: int) -> dict:
    """CPU model, cores, threads and library versions, for the results file."""
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def median(values: list[float]) -> float:
    """Median of the repetitions."""
    return statistics.median(values)


def fmt(value: float, unit: str) -> str:
    """Human formatting of one absolute value."""
    if unit == "s":
        if value < 0.01:
            return f"{value * 1000:.2f} ms"
        return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"
    if unit == "tok/s":
        return f"{value:.1f} tok/s"
    if unit == "MiB":
        return f"{value:.1f} MiB" if abs(value) < 10 else f"{value:.0f} MiB"
    if unit == "B":
        return f"{value / 2**20:.2f} MiB"
    if unit == "M":
        return f"{value / 1e6:.2f} M"
    return f"{value:g}"


def build_rows(results: dict, args) -> list[dict]:
    """Rows of the results table: a label, a unit, whether higher is better, and per-model medians."""
    rows = []
    for seq_len in args.seq_lens:
        rows.append(dict(key=f"train_{seq_len}", label=f"training step fwd+bwd, T={seq_len}", unit="s", higher=False))
    for seq_len in args.seq_lens:
        rows.append(dict(key=f"prefill_{seq_len}", label=f"prefill latency, T={seq_len}", unit="s", higher=False))
    rows.append(dict(key="decode_tps", label=f"decode tok/s (model loop, {args.prompt_len}+{args.new_tokens})",
                     unit="tok/s", higher=True))
    rows.append(dict(key="generate_tps", label=f"generate() tok/s ({args.prompt_len}+{args.new_tokens}, "
                     "prefill incl.)", unit="tok/s", higher=True))
    for seq_len in args.memory_seq_lens:
        rows.append(dict(key=f"alloc_{seq_len}", label=f"peak training memory (allocated tensors), T={seq_len}",
                         unit="MiB", higher=False))
    for seq_len in args.memory_seq_lens:
        rows.append(dict(key=f"mem_{seq_len}", label=f"peak training RSS increase, T={seq_len}",
                         unit="MiB", higher=False))
        rows.append(dict(key=f"memabs_{seq_len}", label=f"peak RSS of the process (absolute), T={seq_len}",
                         unit="MiB", higher=False))
    rows.append(dict(key="kv_bytes", label=f"KV-cache bytes after {args.prompt_len} tokens", unit="B", higher=False))
    rows.append(dict(key="params", label="parameters", unit="M", higher=False))
    for row in rows:
        row["values"] = {name: values[row["key"]] for name, values in results.items() if row["key"] in values}
    return [row for row in rows if row["values"]]


def check_targets(rows: list[dict], args) -> list[dict]:
    """Issue 6's targets, as ratios to Llama in this run: a list of {target, measured, verdict}."""
    by_key = {row["key"]: row for row in rows}

    def ratio(key, name):
        row = by_key.get(key)
        if row is None or name not in row["values"] or "llama" not in row["values"]:
            return None
        return row["values"][name] / row["values"]["llama"]

    checks = []

    def add(target, key, name, bound, kind):
        value = ratio(key, name)
        if value is None:
            return
        ok = value <= bound if kind == "<=" else (value >= bound if kind == ">=" else abs(value - 1) < 1e-12)
        checks.append(dict(target=target, measured=f"{value:.3f}×", verdict="PASS" if ok else "MISS"))

    for seq_len, bound in ((2048, 1.15), (512, 1.08)):
        add(f"V1 training step ≤ {bound}× at T={seq_len}", f"train_{seq_len}", "diff-v1", bound, "<=")
    for seq_len in args.seq_lens:
        add(f"V2 training step ≤ 1.05× at T={seq_len}", f"train_{seq_len}", "diff-v2", 1.05, "<=")
    for name in ("diff-v1", "diff-v2"):
        add(f"{LABELS[name]} decode tok/s ≥ 0.95×", "decode_tps", name, 0.95, ">=")
    for name in ("diff-v1", "diff-v2"):
        add(f"{LABELS[name]} KV-cache bytes = Llama's", "kv_bytes", name, 1.0, "==")
    for seq_len in args.memory_seq_lens:
        for name in ("diff-v1", "diff-v2"):
            add(f"{LABELS[name]} peak training memory ≤ 1.15× at T={seq_len}", f"alloc_{seq_len}", name, 1.15, "<=")
    return checks


def markdown(rows, checks, info, args) -> str:
    """The results file: settings, machine, the ratio table, the targets."""
    names = [name for name in args.models] + [name for name in LABELS if name.endswith(f"@{args.before}")]
    lines = [
        "# Speed and memory: Llama vs DiffLlama vs DiffTransformer V1 / V2",
        "",
        f"Produced by `python benchmarks/speed.py {' '.join(args.argv)}`".rstrip() + f" on {info['date_utc']}.",
        "",
        f"- Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch threads = {info['torch_threads']} "
        f"(a shared machine: 1-minute load average {info['load_start']:.2f} at the start, {info['load_end']:.2f} at the "
        f"end; absolute times are noisy, ratios come from one interleaved run)",
        f"- Versions: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}",
        f"- Models: hidden {args.hidden}, {args.heads} query heads, {args.kv_heads} KV heads, {args.layers} layers, "
        f"vocab {args.vocab}, intermediate {args.intermediate}; {args.dtype}, attn_implementation=\"{args.attn}\", "
        f"batch 1",
        f"- Timing: median of {args.repeats} repetitions after one warm-up, models interleaved inside each "
        f"repetition, {args.clock} clock",
        "",
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
            ratio = f"{value / base:.3f}× · " if base and value / base >= 0.01 else (
                f"{value / base:.3g}× · " if base else "")
            cells.append(ratio + fmt(value, row["unit"]))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets (issue 6), ratios to Llama in this run", "", "| target | measured | verdict |",
              "| --- | --- | --- |"]
    lines += [f"| {c['target']} | {c['measured']} | {c['verdict']} |" for c in checks]
    lines += ["", f"![ratios to Llama]({args.out.with_suffix('.png').name})", ""]
    return "\n".join(lines)


def write_results(args, text: str, payload: dict) -> None:
    """Print the markdown table, write it to `args.out`, and the settings and `payload` as JSON next to it."""
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    args.out.with_suffix(".json").write_text(json.dumps({"settings": settings, **payload}, indent=1))


def plot(rows, path: Path, args) -> None:
    """Grouped bars of the ratio to Llama per measure (1.0 = Llama; a dashed line marks it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in rows if row["key"] != "params" and not row["key"].startswith("memabs")]
    others = [name for name in args.models if name != "llama"]
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(rows) + 2), 4.8))
    width = 0.8 / max(1, len(others))
    for index, name in enumerate(others):
        xs, ys = [], []
        for position, row in enumerate(rows):
            if name in row["values"] and row["values"].get("llama"):
                xs.append(position + (index - (len(others) - 1) / 2) * width)
                ys.append(row["values"][name] / row["values"]["llama"])
        ax.bar(xs, ys, width, label=LABELS[name])
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([row["label"].replace(", ", "\n", 1) for row in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("ratio to Llama (time/memory: lower is better; tok/s: higher)")
    ax.set_title(f"{args.layers} layers, hidden {args.hidden}, {args.dtype}, {args.attn}, {args.threads} threads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser, threads: int = 2) -> None:
    """The model-size flags every benchmark script shares, with speed.py's defaults (`threads` threads)."""
    parser.add_argument("--layers", type=int, default=6, help="decoder layers of every model (default: 6)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (default: 512)")
    parser.add_argument("--heads", type=int, default=8, help="query heads, Llama's counting (default: 8)")
    parser.add_argument("--kv-heads", type=int, default=4, help="KV heads, Llama's counting (default: 4)")
    parser.add_argument("--intermediate", type=int, default=1376, help="MLP width (default: 1376)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default: 8192)")
    parser.add_argument("--threads", type=int, default=threads, help=f"torch intra-op threads (default: {threads})")


def parse_args(argv=None):
    """Command-line flags (every one has --help text)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 4096],
                        help="sequence lengths T of the training step and prefill measures (default: 512 2048 4096)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repetitions per model and measure, the median is reported (default: 3)")
    add_model_arguments(parser)
    parser.add_argument("--max-positions", type=int, default=4096, help="max_position_embeddings floor (default: 4096)")
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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu (default), or cuda for the GPU table (stops cleanly when CUDA is absent)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES,
                        help="which models to run; llama is needed for the ratios (default: all four)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help=CLOCK_HELP + " (default: wall)")
    parser.add_argument("--before", metavar="REV", default=None,
                        help="also measure V1 and V2 built by the modeling code of this git revision (same weights), "
                        "in the same interleaved run")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (hidden 64, 2 layers, T 32 64, 1 repetition, 8 new tokens, 1 thread) that run "
                        "in seconds; for the smoke test, the numbers mean nothing")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "speed.md",
                        help="markdown results file; the PNG and the raw JSON go next to it "
                        "(default: benchmarks/results/speed.md)")
    parser.add_argument("--memory-worker", metavar="JSON", default=None,
                        help="internal: run one peak-RSS measurement described by JSON and print the result")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.hidden, args.heads, args.kv_heads, args.layers = 64, 8, 4, 2
        args.intermediate, args.vocab, args.max_positions = 176, 256, 128
        args.seq_lens, args.prompt_len, args.new_tokens, args.repeats = [32, 64], 16, 8, 1
        args.threads = 1  # no OpenMP barriers: robust on a busy machine; quick numbers mean nothing
        args.memory_jobs = max(args.memory_jobs, 4)
        if args.memory_seq_lens is None:
            args.memory_seq_lens = [32]
    if args.memory_seq_lens is None:
        args.memory_seq_lens = list(args.seq_lens)
    return args


def main(argv=None) -> dict:
    """Run every measure, interleaved; write the markdown, PNG and JSON; return the raw results."""
    args = parse_args(argv)
    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return {}
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("CUDA is not available on this machine: the GPU benchmark (bf16, flash_attention_2, compiled "
                  "static-cache decode) was not run.")
            return {}
        raise SystemExit("The GPU table is not implemented in this script yet: it has not been run anywhere.")
    if args.dtype != "float32":
        print(f"note: {args.dtype} on CPU is measured as asked; the issue's table is float32.")
    if "llama" not in args.models:
        raise SystemExit("--models must include llama: every ratio is to Llama")
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    dtype = getattr(torch, args.dtype)
    numbers = config_numbers(args)
    models = {name: build_model(name, numbers, args.attn, dtype) for name in args.models}
    for name in [name for name in args.models if name.startswith("diff-")] if args.before else []:
        before = f"{name}@{args.before}"  # timed and measured in process; not in the RSS subprocesses or the chart
        LABELS[before] = f"{LABELS[name]} ({args.before})"
        models[before] = build_model(name, numbers, args.attn, dtype, revision=args.before)
        models[before].load_state_dict(models[name].state_dict())
    results = {name: {"params": float(sum(p.numel() for p in model.parameters()))} for name, model in models.items()}
    raw = {name: {} for name in models}
    ids = {seq_len: random_ids(args.vocab, seq_len, seed=seq_len) for seq_len in args.seq_lens}
    prompt = random_ids(args.vocab, args.prompt_len, seed=7)

    # (key, callable(model) -> value) pairs, each run for every model inside one repetition
    measures = []
    clock = CLOCKS[args.clock]
    for seq_len in args.seq_lens:
        measures.append((f"train_{seq_len}", lambda m, t=seq_len: train_step_seconds(m, ids[t], clock)))
        measures.append((f"prefill_{seq_len}", lambda m, t=seq_len: prefill_seconds(m, ids[t], clock)))
    measures.append(("decode", lambda m: decode_seconds(m, prompt, args.new_tokens, clock)))
    measures.append(("generate", lambda m: generate_seconds(m, prompt, args.new_tokens, clock)))

    for name, values in time_interleaved(models, measures, args.repeats).items():
        for key, measured in values.items():
            raw[name][key] = measured

    for name in models:
        for key, values in raw[name].items():
            if key == "decode":
                results[name]["decode_tps"] = args.new_tokens / median([v[0] for v in values])
                results[name]["kv_bytes"] = float(values[0][1])
            elif key == "generate":
                results[name]["generate_tps"] = args.new_tokens / median(values)
            else:
                results[name][key] = median(values)

    for seq_len in tqdm(args.memory_seq_lens, desc="peak allocated memory", unit="T"):
        memory_ids = random_ids(args.vocab, seq_len, seed=seq_len)
        for name, model in models.items():
            results[name][f"alloc_{seq_len}"] = peak_allocated_mib(model, memory_ids)

    del models
    memory_runs = [(t, name) for t in args.memory_seq_lens for name in args.models]
    specs = [dict(model=name, numbers=numbers, seq_len=t, threads=args.threads, task="train",
                  attn_implementation=args.attn) for t, name in memory_runs]
    # Peak RSS is per process, so parallel workers do not disturb each other's numbers (only the wall time).
    with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
        measured_all = list(tqdm(pool.map(measure_in_subprocess, specs), total=len(specs),
                                 desc="peak memory (fresh subprocess each)", unit="proc"))
    for (seq_len, name), measured in zip(memory_runs, measured_all):
        results[name][f"mem_{seq_len}"] = measured["peak_increase_mib"]
        results[name][f"memabs_{seq_len}"] = measured["peak_rss_mib"]
        raw[name][f"mem_{seq_len}"] = measured

    info = machine_info(args.threads)
    info["load_start"], info["load_end"] = load_start, os.getloadavg()[0]
    rows = build_rows(results, args)
    checks = check_targets(rows, args)
    write_results(args, markdown(rows, checks, info, args),
                  {"machine": info, "results": results, "raw": raw, "targets": checks})
    plot(rows, args.out.with_suffix(".png"), args)
    return {"results": results, "rows": rows, "targets": checks}


if __name__ == "__main__":
    main()
