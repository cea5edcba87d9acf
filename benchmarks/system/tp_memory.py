"""Memory per rank with tensor parallelism (TP=2, `from_pretrained(..., tp_plan="auto")`), CPU processes on gloo.

    python -m benchmarks.system.tp_memory            # ~130M-parameter V1, V2 and Llama (hidden 1024, 8 layers)
    python -m benchmarks.system.tp_memory --quick    # tiny, seconds

For each model (Diff V1, Diff V2 and a Llama with the same config numbers, tied embeddings), the script saves a
random float32 checkpoint, then loads it (a) whole in one process and (b) with `tp_plan="auto"` in each of the two
processes of `torchrun --nproc_per_node 2`, and runs one forward pass of 512 tokens. Per process it records:

- the bytes of the parameters this process holds (local shards of DTensors, whole tensors otherwise): exact;
- its resident memory after the forward pass (VmRSS, and RssAnon: without file-backed pages such as the
  memory-mapped checkpoint) and its peak (VmHWM), read from the OS: they add torch/transformers' own ~0.4 GB and
  the activations;
- with TP, the largest |difference| of its logits from the one-process logits on the same tokens.

Results go to benchmarks/results/tp_memory/tp_memory.md, .json and .png (`--out` elsewhere).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness.memory import process_memory
from benchmarks.harness.models import ROOT, build_model
from benchmarks.harness.report import (
    add_run_arguments,
    bar_chart,
    command,
    header,
    machine_info,
    write_results,
)

MODELS = {"Diff V1": "diff-v1", "Diff V2": "diff-v2", "Llama": "llama"}


def config_numbers(quick: bool) -> dict:
    """The shared config numbers (Llama's head counting): 16 query heads, 8 KV heads of width 64; tiny with `quick`."""
    if quick:
        return dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=8,
                    num_key_value_heads=4, tie_word_embeddings=True)
    return dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True)


def save_models(folder: Path, numbers: dict, names: list[str]) -> None:
    """A random float32 checkpoint of each model of `names` under `folder / name`."""
    for name in names:
        build_model(name, numbers).save_pretrained(folder / name)


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
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    result = {"param_bytes": held, "full_param_bytes": full, **process_memory("VmHWM", "VmRSS", "RssAnon")}
    reference = folder / "logits_one_process.pt"
    if tp:  # the same input in one process (measured first): the sharded model must give the same logits
        result["max_logit_diff"] = (logits - torch.load(reference)).abs().max().item()
    else:
        torch.save(logits, reference)
    return result


def worker(folder: Path, tp: bool, seq_len: int, out: Path) -> None:
    """One process's measurement, written to `out` (rank 0 under torchrun: every rank's, gathered)."""
    result = measure(folder, tp, seq_len)
    if tp:
        import torch.distributed as dist

        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        # tear down before exit: one run without this aborted at exit ("terminate called without an active exception")
        dist.destroy_process_group()
        if int(os.environ["RANK"]) != 0:
            return
        result = {"ranks": gathered}
    out.write_text(json.dumps(result))


def run_worker(folder: Path, tp: bool, seq_len: int, out: Path) -> dict:
    """Measure in fresh processes (one, or two under torchrun), so that each peak RSS is its own.

    Not ru_maxrss for the peak: Linux carries it over from the parent through fork and exec, so a worker started by
    a process that held the saved models would report the parent's peak; VmHWM is the worker's own.
    """
    args = ["-m", "benchmarks.system.tp_memory", "--worker", str(folder), "--seq-len", str(seq_len),
            "--worker-out", str(out)] + (["--tp"] if tp else [])
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    argv = (launcher if tp else [sys.executable]) + args
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def markdown(rows: dict, numbers: dict, info: dict, argv: list[str], elapsed: float) -> str:
    """The table of parameter bytes and resident memory per process, and how to read it."""
    mib = 2**20
    lines = header(
        "Memory per rank with tensor parallelism (TP=2)", command("benchmarks.system.tp_memory", argv), info,
        f"CPU processes on gloo, 1 thread each; {elapsed:.0f} s",
        "Models: " + ", ".join(f"{k} {v}" for k, v in numbers.items()) + "; float32, random weights, one forward"
        " pass of 512 tokens",
        "Parameter bytes are exact (local shards of the DTensors, a tied weight counted once). Resident memory is"
        " read from /proc/self/status after the forward pass: VmRSS, RssAnon (VmRSS without file-backed pages such"
        " as the memory-mapped checkpoint) and the peak VmHWM; all include the Python/torch/transformers runtime and"
        " the activations.",
    )
    lines.append(
        "| model | parameters, 1 process | per rank, TP=2 (rank 0 / 1) | ratio | RSS after the forward, 1 process"
        " | per rank, TP=2 | of which anonymous, 1 process | per rank, TP=2 | peak RSS, 1 process | per rank, TP=2"
        " | max abs logit difference, TP=2 vs 1 process |"
    )
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        one, ranks = row["one"], row["tp"]["ranks"]
        cells = [name, f"{one['param_bytes'] / mib:.1f} MiB"]
        cells.append(" / ".join(f"{r['param_bytes'] / mib:.1f}" for r in ranks) + " MiB")
        cells.append(f"{ranks[0]['param_bytes'] / one['param_bytes']:.3f}×")
        for key in ("VmRSS", "RssAnon", "VmHWM"):
            cells.append(f"{one[key] / mib:.0f} MiB")
            cells.append(" / ".join(f"{r[key] / mib:.0f}" for r in ranks) + " MiB")
        cells.append(f"{max(r['max_logit_diff'] for r in ranks):.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "What stays whole on every rank: the RMSNorm weights (and V1's λ vectors and per-head norm weight), a few KiB",
        "per layer; everything else (q/k/v/o, λ projection of V2, the MLP, the tied embedding/head) is split in two.",
        "",
        "Reading the RSS columns: one process memory-maps the checkpoint and uses its tensors in place, so most of",
        "its weights are file-backed pages (VmRSS − RssAnon), not anonymous memory. A TP rank also reads its shards",
        "through the mapping (how many of them stay mapped rather than copied is up to transformers' loader), and",
        "file pages of the checkpoint count in the VmRSS of every rank that touched them although the machine holds",
        "them once, in its page cache. On CPUs the process RSS is therefore no measure of what TP saves; the",
        "parameter bytes are the memory each rank's weights take, what a GPU rank would hold for them (no GPU was",
        "used here).",
        "",
        "![parameters held per process](tp_memory.png)",
    ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens of the forward pass (default: 512)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS.values()), default=list(MODELS.values()),
                        help="models to measure (default: all three)")
    add_run_arguments(parser, "tp_memory", "tp_memory.md", quick="tiny models, for a smoke run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measuring process
    parser.add_argument("--tp", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(Path(args.worker), args.tp, args.seq_len, Path(args.worker_out))

    start = time.perf_counter()
    info = machine_info(threads=1)
    numbers = config_numbers(args.quick)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_models(Path(tmp), numbers, args.models)
        for label in [label for label, name in MODELS.items() if name in args.models]:
            name = MODELS[label]
            rows[label] = {
                tp: run_worker(Path(tmp) / name, tp == "tp", args.seq_len, Path(tmp) / "out.json")
                for tp in ("one", "tp")
            }
            print(f"{label}: {rows[label]['one']['param_bytes'] / 2**20:.1f} MiB whole, "
                  f"{rows[label]['tp']['ranks'][0]['param_bytes'] / 2**20:.1f} MiB on rank 0 with TP=2", flush=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    chart = bar_chart(args.out.with_suffix(".png"), list(rows),
                      {"1 process": [row["one"]["param_bytes"] / 2**20 for row in rows.values()],
                       "TP=2, rank 0": [row["tp"]["ranks"][0]["param_bytes"] / 2**20 for row in rows.values()]},
                      "parameter memory (MiB)", 'Parameters held per process, tp_plan="auto"', reference=None)
    write_results(args.out, markdown(rows, numbers, info, argv, time.perf_counter() - start),
                  {"settings": " ".join(argv), "machine": info, "config": numbers, "rows": rows, "chart": chart})
    return {"rows": rows, "chart": chart}


if __name__ == "__main__":
    main()
