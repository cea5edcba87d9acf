#!/usr/bin/env python
"""The V1 differential-attention core alone: which way of computing it is fastest on CPU sdpa?

Differential attention (paper V1) per differential head i of KV group g:

    out_i = softmax(q1_i k1_gᵀ/√d) v_g - λ softmax(q2_i k2_gᵀ/√d) v_g,     q, k of width d, v of width 2d

with the cache layout of `modeling_diff`: one key of width 2d per KV group holding k1‖k2, one value of width
2d, as many key heads as value heads. The candidate schemes, all reading that layout without changing it:

    llama       baseline: Llama's core with the same config numbers (H query heads, 2G KV heads, width d)
    (a) padded  what the model does: q1 zero-padded on the right and q2 on the left to 2d, so both maps come
                from ONE sdpa call on the cache key/value as they are (QKᵀ at width 2d: 2× Llama's FLOPs);
                the padded queries are built by one `torch.diag_embed`, the two maps of a head adjacent
    (a')        the same with the padded queries built by pad + pad + stack, maps outermost in each KV group
                (what the model did before; three kernels instead of one)
    (b) 4-call  the split-value scheme of the official `multihead_flashdiff_2.py`: q1/k1 with each half of v,
                q2/k2 likewise, four sdpa calls at width d (QKᵀ computed twice per map: 2× Llama's FLOPs)
    (c) 2-call  q/k of width d against v of width 2d, one call per map (1.5× Llama's FLOPs if a kernel took it)
    (d) maps    materialised maps in plain torch: S1, S2 at width d, A = softmax(S1) - λ softmax(S2), A·v once
                (exactly Llama's FLOPs, but no causal block skipping and T² memory per head)

Timed, interleaved and median of `--repeats`: the training core (forward + backward, causal, batch 1) at each
`--seq-lens`, and one decode step (one query token per head against a cache of `--cache-lens` tokens, no grad).
Every scheme is checked against (d) for equal outputs first. Writes `benchmarks/results/attention_kernels.md`
and a PNG next to it; `--profile` prints torch.profiler's top operators of each scheme at the first T.

    python benchmarks/attention_kernels.py            # about 2 minutes on 2 cores
    python benchmarks/attention_kernels.py --quick    # tiny settings, for the smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
SCHEMES = ("llama", "padded", "padded-stack", "4-call", "2-call", "maps")
DESCRIPTIONS = {
    "llama": "Llama core: 1 sdpa call, q/k/v width d (baseline)",
    "padded": "(a) zero-padded q (one diag_embed), 1 sdpa call at width 2d (the model's choice)",
    "padded-stack": "(a') as (a), q padded by pad+pad+stack",
    "4-call": "(b) 4 sdpa calls at width d, split value (multihead_flashdiff_2)",
    "2-call": "(c) 2 sdpa calls, q/k width d, v width 2d",
    "maps": "(d) materialised maps in plain torch",
}


# ----------------------------------------------------------------------------------------------------------------
# The schemes. Inputs: q (B, T, H, d) straight from q_proj + RoPE, key/value (B, G, S, 2d) as in the cache.
# Output: (B, T, H/2, 2d), the differential heads before the per-head norm. `lam` is the layer's scalar λ.
# Query head layout (the model's): heads = (G groups, P heads per group, 2 maps) with the map innermost.
# ----------------------------------------------------------------------------------------------------------------


def split_query(q: torch.Tensor, groups: int):
    """(B, T, H, d) -> q1, q2 of shape (B, G, P, T, d) each (views)."""
    batch, length, heads, dim = q.shape
    q = q.view(batch, length, groups, heads // (2 * groups), 2, dim)
    return q[..., 0, :].permute(0, 2, 3, 1, 4), q[..., 1, :].permute(0, 2, 3, 1, 4)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """(B, G, P, T, 2d) -> (B, T, G·P, 2d)."""
    batch, groups, per_group, length, width = out.shape
    return out.permute(0, 3, 1, 2, 4).reshape(batch, length, groups * per_group, width)


def core_padded(q, key, value, lam, causal, build="diag_embed"):
    """(a) One sdpa call: [q1‖0] and [0‖q2] against the k1‖k2 key; the model's scheme.

    `build="diag_embed"` builds the padded queries as the model does (one kernel, q1 and q2 of a head adjacent);
    `build="pad+stack"` makes them with two `F.pad` and a `torch.stack`, maps outermost in each KV group.
    """
    batch, length, heads, dim = q.shape
    groups = key.shape[1]
    per_group = heads // (2 * groups)
    q = q.view(batch, length, groups, per_group, 2, dim)
    if build == "diag_embed":
        query = torch.diag_embed(q.transpose(-1, -2), dim1=-3, dim2=-2)  # (B, T, G, P, 2, 2, d)
    else:
        query = torch.stack((F.pad(q[..., 0, :], (0, dim)), F.pad(q[..., 1, :], (dim, 0))), dim=3)  # G, 2, P
    query = query.view(batch, length, heads, 2 * dim).transpose(1, 2)
    # the scale stays 1/√d: the zero half adds nothing to the product, so the width is still d
    out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=dim**-0.5, enable_gqa=True)
    if build == "diag_embed":
        out = out.view(batch, groups, per_group, 2, length, 2 * dim)
        return merge_heads(torch.addcmul(out[:, :, :, 0], lam, out[:, :, :, 1], value=-1))
    out = out.view(batch, groups, 2, per_group, length, 2 * dim)
    return merge_heads(torch.addcmul(out[:, :, 0], lam, out[:, :, 1], value=-1))


def core_padded_stack(q, key, value, lam, causal):
    """(a') As (a), with the padded queries built by pad + pad + stack."""
    return core_padded(q, key, value, lam, causal, build="pad+stack")


def core_four_calls(q, key, value, lam, causal):
    """(b) Four sdpa calls at width d: (q1,k1) and (q2,k2), each with both halves of the value."""
    dim = q.shape[-1]
    groups = key.shape[1]
    q1, q2 = split_query(q, groups)
    batch, _, per_group, length, _ = q1.shape
    k1, k2 = key[..., :dim], key[..., dim:]
    v1, v2 = value[..., :dim], value[..., dim:]

    def call(query, k, v):  # GQA: the P heads of a group share k and v
        query = query.reshape(batch, groups * per_group, length, dim)
        return F.scaled_dot_product_attention(query, k, v, is_causal=causal, enable_gqa=True)

    out1 = torch.cat((call(q1, k1, v1), call(q1, k1, v2)), dim=-1)
    out2 = torch.cat((call(q2, k2, v1), call(q2, k2, v2)), dim=-1)
    out = (out1 - lam * out2).view(batch, groups, per_group, length, 2 * dim)
    return merge_heads(out)


def core_two_calls(q, key, value, lam, causal):
    """(c) Two sdpa calls, q/k of width d and the whole 2d value (CPU sdpa falls back to its math kernel)."""
    dim = q.shape[-1]
    groups = key.shape[1]
    q1, q2 = split_query(q, groups)
    batch, _, per_group, length, _ = q1.shape

    def call(query, k):
        query = query.reshape(batch, groups * per_group, length, dim)
        return F.scaled_dot_product_attention(query, k, value, is_causal=causal, enable_gqa=True)

    out = call(q1, key[..., :dim]) - lam * call(q2, key[..., dim:])
    return merge_heads(out.view(batch, groups, per_group, length, 2 * dim))


def core_maps(q, key, value, lam, causal):
    """(d) Materialised maps: two width-d score matrices, their softmaxes subtracted, one product with v."""
    dim = q.shape[-1]
    groups = key.shape[1]
    q1, q2 = split_query(q, groups)  # (B, G, P, T, d)
    length, source = q1.shape[-2], key.shape[-2]
    k1 = key[..., :dim].unsqueeze(2)  # (B, G, 1, S, d), broadcast over the P heads of the group
    k2 = key[..., dim:].unsqueeze(2)
    scale = dim**-0.5
    s1 = torch.matmul(q1, k1.transpose(-1, -2)) * scale
    s2 = torch.matmul(q2, k2.transpose(-1, -2)) * scale
    if causal:
        mask = torch.ones(length, source, dtype=torch.bool, device=q.device).tril(source - length)
        s1 = s1.masked_fill(~mask, float("-inf"))
        s2 = s2.masked_fill(~mask, float("-inf"))
    attn = torch.softmax(s1, dim=-1) - lam * torch.softmax(s2, dim=-1)
    return merge_heads(torch.matmul(attn, value.unsqueeze(2)))


def core_llama(q, key, value, lam, causal):
    """Baseline: Llama's core with the same config numbers, q (B, T, H, d), k/v (B, 2G, S, d)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), key, value, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)


CORES = {"llama": core_llama, "padded": core_padded, "padded-stack": core_padded_stack, "4-call": core_four_calls,
         "2-call": core_two_calls, "maps": core_maps}


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------


def make_inputs(scheme, length, source, args, requires_grad):
    """Random q (B, T, H, d) and key/value (B, G, S, 2d); Llama gets (B, 2G, S, d) key/value instead."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, length, args.heads, args.head_dim, generator=generator)
    if scheme == "llama":
        key = torch.randn(1, args.kv_heads, source, args.head_dim, generator=generator)
        value = torch.randn(1, args.kv_heads, source, args.head_dim, generator=generator)
    else:
        key = torch.randn(1, args.kv_heads // 2, source, 2 * args.head_dim, generator=generator)
        value = torch.randn(1, args.kv_heads // 2, source, 2 * args.head_dim, generator=generator)
    lam = torch.tensor(0.5)
    if requires_grad:
        for tensor in (q, key, value, lam):
            tensor.requires_grad_(True)
    return q, key, value, lam


def train_seconds(scheme, inputs) -> float:
    """Forward + backward of the core, causal, on pre-built inputs."""
    for tensor in inputs:
        tensor.grad = None
    start = time.perf_counter()
    out = CORES[scheme](*inputs, causal=True)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds(scheme, inputs, steps: int) -> float:
    """Seconds per decode step: one query token per head against the whole cache (mean over `steps`)."""
    start = time.perf_counter()
    for _ in range(steps):
        CORES[scheme](*inputs, causal=False)
    return (time.perf_counter() - start) / steps


def check_equal(args) -> dict:
    """Max abs difference of each V1 scheme to (d) on one small causal problem and one decode step."""
    differences = {}
    for scheme in SCHEMES[1:]:
        worst = 0.0
        for length, source, causal in ((64, 64, True), (1, 64, False)):
            inputs = make_inputs(scheme, length, source, args, requires_grad=False)
            reference = core_maps(*inputs, causal=causal)
            worst = max(worst, (CORES[scheme](*inputs, causal=causal) - reference).abs().max().item())
        differences[scheme] = worst
    return differences


def profile_schemes(length, args) -> str:
    """torch.profiler's top operators (self CPU time) of forward + backward of every scheme at T=length."""
    from torch.profiler import ProfilerActivity, profile

    tables = []
    for scheme in SCHEMES:
        inputs = make_inputs(scheme, length, length, args, requires_grad=True)
        train_seconds(scheme, inputs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_seconds(scheme, inputs)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
        tables.append(f"### {scheme} (T={length}, forward + backward)\n\n```\n{table}\n```\n")
    return "\n".join(tables)


def run(args) -> dict:
    """Time every scheme, interleaved; return {measure: {scheme: median seconds}}."""
    results, raw = {}, {}
    measures = [(f"train_{t}", t) for t in args.seq_lens] + [(f"decode_{s}", s) for s in args.cache_lens]
    with tqdm(total=len(measures) * (args.repeats + 1) * len(SCHEMES), desc="attention cores", unit="run") as bar:
        for key, size in measures:
            training = key.startswith("train")
            inputs = {s: make_inputs(s, size if training else 1, size, args, requires_grad=training) for s in SCHEMES}
            for repetition in range(args.repeats + 1):  # 0 is the warm-up
                order = SCHEMES if repetition % 2 == 0 else SCHEMES[::-1]
                for scheme in order:
                    bar.set_postfix_str(f"{key} {scheme}")
                    if training:
                        seconds = train_seconds(scheme, inputs[scheme])
                    else:
                        seconds = decode_seconds(scheme, inputs[scheme], args.decode_steps)
                    if repetition:
                        raw.setdefault(key, {}).setdefault(scheme, []).append(seconds)
                    bar.update()
            results[key] = {s: statistics.median(v) for s, v in raw[key].items()}
    return results


def markdown(results, differences, args, profile_text: str = "") -> str:
    """The results file: settings, the table of ratios to Llama's core, the equality check."""
    sys.path.insert(0, str(HERE))
    from speed import machine_info

    info = machine_info(args.threads)
    lines = [
        "# The V1 attention core alone, CPU sdpa",
        "",
        f"Produced by `python benchmarks/attention_kernels.py {' '.join(args.argv)}`".rstrip()
        + f" on {info['date_utc']}.",
        "",
        f"- Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch threads = {args.threads} "
        f"(1-minute load average {os.getloadavg()[0]:.2f} when the run ended; ratios come from one interleaved run)",
        f"- Versions: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}",
        f"- Shapes: {args.heads} query heads, {args.kv_heads} KV heads (Llama's counting), head_dim {args.head_dim}, "
        f"batch 1, float32. Median of {args.repeats} after a warm-up, schemes interleaved.",
        f"- Decode: mean of {args.decode_steps} steps of one query token per head against a cache of S tokens.",
        "",
        "Each cell: ratio to Llama's core · absolute time.",
        "",
        "| scheme | " + " | ".join(
            (f"fwd+bwd T={k[6:]}" if k.startswith("train") else f"decode step S={k[7:]}") for k in results
        ) + " |",
        "| --- | " + " | ".join("---" for _ in results) + " |",
    ]
    for scheme in SCHEMES:
        cells = []
        for values in results.values():
            seconds = values[scheme]
            unit = f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"
            cells.append(f"{seconds / values['llama']:.3g}× · {unit}")
        lines.append(f"| {DESCRIPTIONS[scheme]} | " + " | ".join(cells) + " |")
    lines += ["", "Max |difference| to (d) on a 64-token causal problem and a decode step (all schemes compute "
              "the same function):", ""]
    lines += [f"- {scheme}: {value:.2e}" for scheme, value in differences.items()]
    lines += ["", "![ratio to Llama's core](attention_kernels.png)", ""]
    if profile_text:
        lines += ["## torch.profiler, top operators by self CPU time", "", profile_text]
    return "\n".join(lines)


def plot(results, path: Path, args) -> None:
    """Grouped bars: ratio of each V1 scheme to Llama's core, per measure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    schemes = SCHEMES[1:]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(keys) + 2), 4.5))
    width = 0.8 / len(schemes)
    for index, scheme in enumerate(schemes):
        xs = [position + (index - (len(schemes) - 1) / 2) * width for position in range(len(keys))]
        ax.bar(xs, [results[k][scheme] / results[k]["llama"] for k in keys], width, label=DESCRIPTIONS[scheme])
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="Llama's core")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k.replace("train_", "fwd+bwd T=").replace("decode_", "decode S=") for k in keys])
    ax.set_ylabel("time / Llama's core time")
    ax.set_title(f"V1 attention core, CPU sdpa, {args.heads} heads / {args.kv_heads} KV heads, d={args.head_dim}, "
                 f"{args.threads} threads")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    """Command-line flags (every one has --help text)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048, 4096],
                        help="T of the causal forward+backward measure (default: 512 2048 4096)")
    parser.add_argument("--cache-lens", type=int, nargs="+", default=[640, 8192],
                        help="cache lengths S of the decode-step measure (default: 640 8192)")
    parser.add_argument("--heads", type=int, default=8, help="query heads, Llama's counting (default: 8)")
    parser.add_argument("--kv-heads", type=int, default=4, help="KV heads, Llama's counting, even (default: 4)")
    parser.add_argument("--head-dim", type=int, default=64, help="width d of one query/key head (default: 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions, median reported (default: 5)")
    parser.add_argument("--decode-steps", type=int, default=50,
                        help="decode steps averaged inside one repetition (default: 50)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile every scheme with torch.profiler at the first T and append the tables")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings (T 32 64, S 32, 1 repetition, 1 thread) for the smoke test; numbers mean nothing")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "attention_kernels.md",
                        help="markdown results file; the PNG goes next to it "
                        "(default: benchmarks/results/attention_kernels.md)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.kv_heads % 2 or args.heads % args.kv_heads:
        parser.error("--kv-heads must be even (k1 and k2 per group) and divide --heads")
    if args.quick:
        args.seq_lens, args.cache_lens, args.repeats, args.decode_steps = [32, 64], [32], 1, 2
        args.threads = 1  # no OpenMP barriers: robust on a busy machine; quick numbers mean nothing
    return args


def main(argv=None) -> dict:
    """Check, time, (optionally) profile, then write the markdown and the PNG."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    differences = check_equal(args)
    results = run(args)
    profile_text = profile_schemes(args.seq_lens[0], args) if args.profile else ""
    text = markdown(results, differences, args, profile_text)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plot(results, args.out.with_suffix(".png"), args)
    return {"results": results, "differences": differences}


if __name__ == "__main__":
    main()
