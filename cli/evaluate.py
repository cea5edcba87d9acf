"""`diff-transformer eval`: perplexity, tokens/s and λ statistics, or the paper's measurements (needle retrieval,
attention noise, activation outliers) on any causal LM folder: Llama, DiffLlama or DiffTransformer."""

import json
import time
from pathlib import Path

import torch
from modeling_diff_conversion.output import check_apart, check_text_output, write_text_output
from modeling_diff_training import check_fits_in_memory

from .common import CLIError, format_lambda_table, lambda_statistics, load_model, resolve_model_path
from .data import train_eval_texts

WRITTEN_BY = "diff-transformer eval"


def add_arguments(parser):
    parser.add_argument("model", help="model to evaluate: a folder, a Hub id or a .gguf file")
    parser.add_argument(
        "--task",
        default="ppl",
        choices=["ppl", "needle", "attention-noise", "outliers"],
        help="ppl: held-out perplexity, tokens/s and λ per layer (default); needle: multi-needle "
        "retrieval accuracy; attention-noise: attention share on the answer span vs the rest; "
        "outliers: top-1/top-10 activation magnitude over the median",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="text for ppl/outliers: a file, folder or HF datasets name (default: the held-out "
        "split of Python's reference docs)",
    )
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window for ppl and outliers")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    parser.add_argument("--needles", type=int, default=None, help="needle/attention-noise: needles in the context")
    parser.add_argument("--context-len", type=int, default=None, help="needle/attention-noise: context tokens")
    parser.add_argument("--samples", type=int, default=None, help="needle/attention-noise: examples to average")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task generator")
    parser.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="also write the results to this JSON file (a new file, or one this command wrote before)",
    )


def evaluate_ppl(model, tokenizer, texts=None, seq_len=256, batch_size=4, max_batches=None, progress=True) -> dict:
    """Held-out perplexity, forward tokens per second, and λ per layer (for differential models)."""
    from modeling_diff_eval.tasks import run_task

    started = time.perf_counter()
    result = run_task(
        "ppl",
        model,
        tokenizer,
        texts=texts,
        seq_len=seq_len,
        batch_size=batch_size,
        max_batches=max_batches,
        progress=progress,
    )
    result["tokens_per_second"] = result["tokens"] / (time.perf_counter() - started)
    sample = torch.tensor([tokenizer(texts[0] if texts else "def main():\n    return 0\n").input_ids[:seq_len]])
    result["lambda"] = lambda_statistics(model, sample)
    return result


def check_arguments(args) -> None:
    """Refuse an out-of-range number before the model loads (a batch count of 0 would divide by zero)."""
    for flag, value in (
        ("--seq-len", args.seq_len),
        ("--batch-size", args.batch_size),
        ("--max-batches", args.max_batches),
        ("--needles", args.needles),
        ("--context-len", args.context_len),
        ("--samples", args.samples),
    ):
        if value is not None and value < 1:
            raise CLIError(f"{flag} is {value}: give a positive number")


def is_results_file(text: str) -> bool:
    """Whether `text` is a results file this command wrote: one that `--json` may replace."""
    record = json.loads(text)
    return isinstance(record, dict) and record.get("written_by") == WRITTEN_BY


def run(args) -> int:
    from modeling_diff_eval.tasks import format_table, run_task

    check_arguments(args)
    if args.json:
        # the results file is an output: apart from every input, and never a file this command did not write
        check_apart(args.json, {"MODEL": args.model, "--dataset": args.dataset}, what="--json file")
        check_text_output(args.json, WRITTEN_BY, is_results_file)
        folder, gguf_file = resolve_model_path(args.model)  # a Hub id: where it resolved to, in the HF cache
        check_apart(args.json, {"MODEL": Path(folder) / (gguf_file or "")}, what="--json file")
    texts = None
    if args.dataset is not None and args.task in ("ppl", "outliers"):
        texts = train_eval_texts(args.dataset)[1]
    model, tokenizer = load_model(args.model)
    check_fits_in_memory(model.config, args.context_len or args.seq_len, args.batch_size, training=False)
    try:
        if args.task == "ppl":
            result = evaluate_ppl(model, tokenizer, texts, args.seq_len, args.batch_size, args.max_batches)
            lambdas = result.pop("lambda")
            print(format_table("ppl", result))
            print(f"\nλ per layer:\n{format_lambda_table(lambdas)}")
            result["lambda"] = lambdas
        else:
            # run_task drops the options left at None, so the task's own defaults apply
            options = dict(needles=args.needles, context_len=args.context_len, samples=args.samples, seed=args.seed)
            if args.task == "outliers":
                options = dict(
                    texts=texts, seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.max_batches
                )
            result = run_task(args.task, model, tokenizer, **options)
            print(format_table(args.task, result))
    except ValueError as err:
        raise CLIError(str(err).splitlines()[0])
    result["model"] = args.model
    if args.json:
        write_text_output(
            args.json, json.dumps({**result, "written_by": WRITTEN_BY}, indent=2) + "\n", WRITTEN_BY, is_results_file
        )
        print(f"wrote {args.json}")
    return 0
