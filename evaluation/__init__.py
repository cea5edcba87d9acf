"""Evaluation tasks and corpora for causal LMs (installed as `modeling_diff_eval`).

Works on any causal LM (Llama, DiffLlama or DiffTransformer): perplexity, multi-needle retrieval, attention noise
and activation outliers (`tasks.run_task`), λ per layer (`metrics.lambda_statistics`), and the text corpora that the
CLI and the studies train and evaluate on (`corpus`).

    from modeling_diff_eval import evaluate_ppl, train_eval_texts
    train_texts, held_out = train_eval_texts("my-corpus.jsonl")
    print(evaluate_ppl(model, tokenizer, held_out)["perplexity"])
"""

from .corpus import EvaluationError, load_texts, python_docs_texts, split_documents, train_eval_texts
from .metrics import format_lambda_table, lambda_statistics
from .tasks import TASK_NAMES, check_options, evaluate_ppl, format_table, run_task

__all__ = [
    "EvaluationError",
    "TASK_NAMES",
    "check_options",
    "evaluate_ppl",
    "format_lambda_table",
    "format_table",
    "lambda_statistics",
    "load_texts",
    "python_docs_texts",
    "run_task",
    "split_documents",
    "train_eval_texts",
]
