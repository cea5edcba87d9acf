"""Peak memory of `diff-transformer convert` on a synthetic sharded Llama checkpoint.

    python -m benchmarks.system.convert_memory            # ~156M-parameter bf16 Llama in 4 shards of ~100 MB
    python -m benchmarks.system.convert_memory --quick    # tiny, for the test suite

The converter streams the source tensor by tensor (lazy safetensors reads) and writes output shards no larger than
the largest source shard, so its peak resident memory should stay within 2 x the largest shard plus the constant
cost of the Python process with torch and transformers imported. This script measures exactly that: the peak RSS
(ru_maxrss) of a `convert --no-verify` subprocess, and of a subprocess that only imports the same modules. Writes
`benchmarks/results/convert_memory/convert_memory.md` and `.json`.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.harness import report

BASELINE = "import torch, transformers, modeling_diff, modeling_diff_conversion, modeling_diff_cli.main"
TARGET = 2.0  # peak RSS above the import-only baseline, in units of the largest source shard


def make_checkpoint(folder: Path, hidden: int, layers: int, vocab: int, shard_mb: int) -> dict:
    """A random bfloat16 Llama saved in shards of at most `shard_mb` MB; returns its description."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        dtype="bfloat16",
    )
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=f"{shard_mb}MB")
    shards = sorted(folder.glob("*.safetensors"))
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "shards": len(shards),
        "largest_shard_mb": max(p.stat().st_size for p in shards) / 2**20,
        "total_mb": sum(p.stat().st_size for p in shards) / 2**20,
    }


def peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one command, read from ru_maxrss inside a fresh wrapper process.

    RUSAGE_CHILDREN reports the largest child a process ever waited for, so each measurement gets its own wrapper.
    """
    wrapper = (
        "import resource, subprocess, sys, time\n"
        "t = time.perf_counter()\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(r.stderr[-2000:]) if r.returncode else None\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t, r.returncode)\n"
    )
    result = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True)
    peak_kb, seconds, code = result.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stderr}")
    return int(peak_kb) / 1024, float(seconds)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the synthetic Llama (default: 1024)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default: 8)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default: 32000)")
    parser.add_argument("--shard-mb", type=int, default=100, help="source shard size in MB (default: 100)")
    parser.add_argument("--variant", choices=["v2", "v1"], default="v2", help="conversion variant (default: v2)")
    report.add_run_arguments(parser, "convert_memory", "convert_memory.md", quick="tiny, for the smoke test")
    args = report.parse_with_argv(parser, argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.shard_mb = 256, 2, 2000, 1
    info = report.machine_info()

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        checkpoint = make_checkpoint(work / "llama", args.hidden, args.layers, args.vocab, args.shard_mb)
        # the constant: a process that imports what the converter imports, and does nothing else
        baseline_mb, _ = peak_rss_mb([sys.executable, "-c", BASELINE])
        convert_mb, seconds = peak_rss_mb([sys.executable, "-m", "modeling_diff_cli.main", "convert",
                                           str(work / "llama"), str(work / "out"), "--variant", args.variant,
                                           "--no-verify"])
        out_shards = len(list((work / "out").glob("*.safetensors")))
    result = {
        **checkpoint,
        "variant": args.variant,
        "output_shards": out_shards,
        "baseline_rss_mb": baseline_mb,
        "peak_rss_mb": convert_mb,
        "seconds": seconds,
        "above_baseline_over_largest_shard": (convert_mb - baseline_mb) / checkpoint["largest_shard_mb"],
    }
    ratio = result["above_baseline_over_largest_shard"]
    lines = report.header(
        "Peak memory of `diff-transformer convert`", report.command("benchmarks.system.convert_memory", args.argv),
        info,
        f"Source: a random Llama, {checkpoint['parameters'] / 1e6:.0f}M parameters, bfloat16, {checkpoint['shards']} "
        f"shards, largest {checkpoint['largest_shard_mb']:.0f} MB, total {checkpoint['total_mb']:.0f} MB",
        f"Peak RSS = ru_maxrss of the process; `convert --variant {args.variant} --no-verify` wrote "
        f"{out_shards} output shard(s) in {seconds:.1f} s",
    )
    lines += [
        "| process | peak RSS |",
        "| --- | --- |",
        f"| imports only (`{BASELINE}`) | {baseline_mb:.0f} MB |",
        f"| `convert --variant {args.variant} --no-verify` | {convert_mb:.0f} MB |",
        "",
        f"Peak above the import-only baseline: **{ratio:.2f} × the largest source shard** (target ≤ {TARGET:g}): "
        f"{'PASS' if ratio <= TARGET else 'MISS'}.",
    ]
    report.write_results(args.out, "\n".join(lines),
                         {"settings": report.settings_of(args), "machine": info, "result": result})
    return result


if __name__ == "__main__":
    main()
