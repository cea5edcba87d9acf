"""`diff-transformer eval`: perplexity, tokens/s and λ statistics, or the paper's measurements (needle retrieval,
attention noise, activation outliers) on any causal LM folder: Llama, DiffLlama or DiffTransformer."""

import json
from pathlib import Path

from modeling_diff_conversion import load_model, resolve_model_path
from modeling_diff_conversion.output import check_apart, check_text_output, write_text_output
from modeling_diff_eval import (
    check_options,
    evaluate_ppl,
    format_lambda_table,
    format_table,
    run_task,
    train_eval_texts,
)
from modeling_diff_training import check_fits_in_memory

from .common import add_option

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
    add_option(parser, "seq_len", type=int, default=256, help="tokens per window for ppl and outliers")
    add_option(
        parser, "per_device_eval_batch_size", old=("--batch-size",), type=int, default=4,
        help="windows per forward pass",
    )
    add_option(parser, "max_batches", type=int, default=None, help="evaluate at most this many batches")
    parser.add_argument("--needles", type=int, default=None, help="needle/attention-noise: needles in the context")
    add_option(parser, "context_len", type=int, default=None, help="needle/attention-noise: context tokens")
    parser.add_argument("--samples", type=int, default=None, help="needle/attention-noise: examples to average")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task generator")
    parser.add_argument(
        "--json",
        default=None,
        metavar="FILE",
        help="also write the results to this JSON file (a new file, or one this command wrote before)",
    )


def is_results_file(text: str) -> bool:
    """Whether `text` is a results file this command wrote: one that `--json` may replace."""
    record = json.loads(text)
    return isinstance(record, dict) and record.get("written_by") == WRITTEN_BY


def run(args) -> int:
    windows = dict(seq_len=args.seq_len, batch_size=args.per_device_eval_batch_size, max_batches=args.max_batches)
    needles = dict(needles=args.needles, context_len=args.context_len, samples=args.samples, seed=args.seed)
    check_options(**windows, **needles)  # before the model loads; options left at None take the task's defaults
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
    check_fits_in_memory(
        model.config, args.context_len or args.seq_len, args.per_device_eval_batch_size, training=False
    )
    if args.task == "ppl":
        result = evaluate_ppl(model, tokenizer, texts, **windows)
        lambdas = result.pop("lambda")
        print(format_table("ppl", result))
        print(f"\nλ per layer:\n{format_lambda_table(lambdas)}")
        result["lambda"] = lambdas
    else:
        options = dict(windows, texts=texts) if args.task == "outliers" else needles
        result = run_task(args.task, model, tokenizer, **options)
        print(format_table(args.task, result))
    result["model"] = args.model
    if args.json:
        write_text_output(
            args.json, json.dumps({**result, "written_by": WRITTEN_BY}, indent=2) + "\n", WRITTEN_BY, is_results_file
        )
        print(f"wrote {args.json}")
    return 0
