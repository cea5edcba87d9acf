"""Peak memory of `diff-transformer convert` on a synthetic sharded Llama checkpoint.

    python benchmarks/convert_memory.py            # ~170M-parameter Llama in 8 shards of ~100 MB (bf16)
    python benchmarks/convert_memory.py --quick    # tiny, for the test suite

The converter streams the source tensor by tensor (lazy safetensors reads) and writes output shards no larger than
the largest source shard, so its peak resident memory should stay within 2 x the largest shard plus the constant
cost of the Python process with torch and transformers imported. This script measures exactly that: the peak RSS
(ru_maxrss) of a `convert --no-verify` subprocess, and of a subprocess that only imports the same modules.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

BASELINE = "import torch, transformers, modeling_diff, modeling_diff_conversion, modeling_diff_cli.main"


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


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
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
    result = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True)
    peak_kb, seconds, code = result.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
    return int(peak_kb) / 1024, float(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size of the synthetic Llama")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--shard-mb", type=int, default=100, help="source shard size in MB")
    parser.add_argument("--variant", choices=["v2", "v1"], default="v2", help="conversion variant")
    parser.add_argument("--quick", action="store_true", help="tiny settings for the test suite")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vocab, args.shard_mb = 256, 2, 2000, 1

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        info = make_checkpoint(work / "llama", args.hidden, args.layers, args.vocab, args.shard_mb)
        # the constant: a process that imports what the converter imports, and does nothing else
        baseline_mb, _ = peak_rss_mb([sys.executable, "-c", BASELINE])
        convert_mb, seconds = peak_rss_mb(
            [
                sys.executable,
                "-m",
                "modeling_diff_cli.main",
                "convert",
                str(work / "llama"),
                str(work / "out"),
                "--variant",
                args.variant,
                "--no-verify",
            ]
        )
        out_shards = len(list((work / "out").glob("*.safetensors")))
    result = {
        **info,
        "variant": args.variant,
        "output_shards": out_shards,
        "baseline_rss_mb": baseline_mb,
        "peak_rss_mb": convert_mb,
        "seconds": seconds,
        "above_baseline_over_largest_shard": (convert_mb - baseline_mb) / info["largest_shard_mb"],
    }
    ratio = result["above_baseline_over_largest_shard"]
    print(
        f"synthetic Llama: {info['parameters'] / 1e6:.0f}M parameters, {info['shards']} shards, "
        f"largest {info['largest_shard_mb']:.0f} MB, total {info['total_mb']:.0f} MB (bfloat16)"
    )
    print(
        f"convert --variant {args.variant} --no-verify: peak RSS {convert_mb:.0f} MB in {seconds:.1f} s; "
        f"import-only baseline {baseline_mb:.0f} MB"
    )
    print(f"peak - baseline = {ratio:.2f} x the largest shard (target <= 2): {'PASS' if ratio <= 2 else 'MISS'}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
