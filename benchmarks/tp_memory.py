"""Memory per rank with tensor parallelism (TP=2, `from_pretrained(..., tp_plan="auto")`), CPU processes on gloo.

    python benchmarks/tp_memory.py            # ~130M-parameter V1, V2 and Llama (hidden 1024, 8 layers, vocab 32000)
    python benchmarks/tp_memory.py --quick    # tiny, seconds

For each model (Diff V1, Diff V2 and a Llama with the same config numbers, tied embeddings), the script saves a
random float32 checkpoint, then loads it (a) whole in one process and (b) with `tp_plan="auto"` in each of the two
processes of `torchrun --nproc_per_node 2`, and runs one forward pass of 512 tokens. Per process it records:

- the bytes of the parameters this process holds (local shards of DTensors, whole tensors otherwise): exact;
- its peak resident memory (ru_maxrss) after the forward pass, which adds torch/transformers' own ~0.4 GB and the
  activations, and is read from the OS.

Results go to benchmarks/results/tp_memory.md, .json and .png (`--results` elsewhere).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
MODELS = ("Diff V1", "Diff V2", "Llama")


def config_numbers(quick: bool) -> dict:
    """The shared config numbers (Llama's head counting): 16 query heads, 8 KV heads of width 64."""
    if quick:
        return dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    return dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True)


def save_models(folder: Path, numbers: dict) -> None:
    """A random float32 checkpoint of each model under `folder / name`."""
    import modeling_diff  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_diff import DiffTransformerConfig, DiffTransformerForCausalLM

    for name in MODELS:
        torch.manual_seed(0)
        if name == "Llama":
            model = LlamaForCausalLM(LlamaConfig(**numbers))
        else:
            model = DiffTransformerForCausalLM(DiffTransformerConfig(diff_version=int(name[-1]), **numbers))
        model.save_pretrained(folder / name.replace(" ", "_"))


def measure(folder: Path, tp: bool, seq_len: int) -> dict:
    """Load the checkpoint (sharded when `tp`), run one forward pass; the parameter bytes held and the peak RSS."""
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    import modeling_diff  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(folder, **({"tp_plan": "auto"} if tp else {}))
    held = 0
    for param in model.parameters():  # a tied weight is one parameter, counted once
        local = param.to_local() if isinstance(param, DTensor) else param
        held += local.numel() * local.element_size()
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        model(torch.randint(0, model.config.vocab_size, (1, seq_len)))
    return {"param_bytes": held, "full_param_bytes": full, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def worker(folder: Path, tp: bool, seq_len: int, out: Path) -> None:
    """One process's measurement, written to `out` (rank 0 under torchrun: every rank's, gathered)."""
    result = measure(folder, tp, seq_len)
    if tp:
        import torch.distributed as dist

        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        if dist.get_rank() != 0:
            return
        result = {"ranks": gathered}
    out.write_text(json.dumps(result))


def run_worker(folder: Path, tp: bool, seq_len: int, out: Path) -> dict:
    """Measure in fresh processes (one, or two under torchrun), so that each peak RSS is its own."""
    args = [__file__, "--worker", str(folder), "--seq-len", str(seq_len), "--out", str(out)] + (["--tp"] if tp else [])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    command = (launcher if tp else [sys.executable]) + args
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def write_results(out: Path, rows: dict, numbers: dict, settings: str, elapsed: float) -> None:
    """The table (.md), the raw numbers (.json) and a bar chart (.png) at `out` with those suffixes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    load = os.getloadavg()[0]
    lines = [
        "# Memory per rank with tensor parallelism (TP=2)",
        "",
        f"Produced by `python benchmarks/tp_memory.py {settings}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" in {elapsed:.0f} s.",
        "",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, CPU processes on"
        f" gloo, 1 thread each; 1-minute load average {load:.2f} at the end (the machine is shared)",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {__import__('transformers').__version__}",
        "- Models: " + ", ".join(f"{k} {v}" for k, v in numbers.items()) + "; float32, random weights, one forward"
        " pass of 512 tokens",
        "- Parameter bytes are exact (local shards of the DTensors, a tied weight counted once). Peak RSS is the"
        " process's ru_maxrss after the forward pass: it adds the Python/torch/transformers runtime and the"
        " activations, and is noisier.",
        "",
        "| model | parameters, 1 process | parameters per rank, TP=2 (rank 0 / rank 1) | ratio | peak RSS, 1 process"
        " | peak RSS per rank, TP=2 (rank 0 / rank 1) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        one, ranks = row["one"], row["tp"]["ranks"]
        lines.append(
            f"| {name} | {one['param_bytes'] / mib:.1f} MiB | "
            + " / ".join(f"{r['param_bytes'] / mib:.1f}" for r in ranks)
            + f" MiB | {ranks[0]['param_bytes'] / one['param_bytes']:.3f}× | {one['peak_rss_bytes'] / mib:.0f} MiB | "
            + " / ".join(f"{r['peak_rss_bytes'] / mib:.0f}" for r in ranks)
            + " MiB |"
        )
    lines += [
        "",
        "What stays whole on every rank: the RMSNorm weights (and V1's λ vectors and per-head norm weight), a few KiB",
        "per layer; everything else (q/k/v/o, λ projection of V2, the MLP, the tied embedding/head) is split in two.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "config": numbers, "rows": rows}, indent=1))

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(rows)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [rows[n]["one"]["param_bytes"] / mib for n in names], 0.4, label="1 process")
    ax.bar([i + 0.2 for i in x], [rows[n]["tp"]["ranks"][0]["param_bytes"] / mib for n in names], 0.4,
           label="TP=2, rank 0")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("parameter memory (MiB)")
    ax.set_title("Parameters held per process, tp_plan=\"auto\"")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, for a smoke run")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens of the forward pass")
    parser.add_argument("--results", default=str(RESULTS / "tp_memory"),
                        help="where the .md/.json/.png go, without suffix (default: benchmarks/results/tp_memory)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(Path(args.worker), args.tp, args.seq_len, Path(args.out))

    start = time.perf_counter()
    numbers = config_numbers(args.quick)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_models(Path(tmp), numbers)
        for name in MODELS:
            folder = Path(tmp) / name.replace(" ", "_")
            rows[name] = {tp: run_worker(folder, tp == "tp", args.seq_len, Path(tmp) / "out.json") for tp in ("one", "tp")}
            print(f"{name}: {rows[name]['one']['param_bytes'] / 2**20:.1f} MiB whole, "
                  f"{rows[name]['tp']['ranks'][0]['param_bytes'] / 2**20:.1f} MiB on rank 0 with TP=2", flush=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    write_results(Path(args.results), rows, numbers, " ".join(sys.argv[1:]), time.perf_counter() - start)


if __name__ == "__main__":
    main()
