"""The measurements of the Differential Transformer paper, for any causal LM and tokenizer.

One entry point, `run_task(name, model, tokenizer, **options) -> dict`, with `name` one of `TASK_NAMES`:

| task | what it measures | paper |
| --- | --- | --- |
| ``ppl`` | perplexity on held-out natural text (Python's reference docs by default) | language modelling |
| ``needle`` | multi-needle retrieval accuracy: N needles in `context_len` tokens, R queries | §3.4, Table 2 |
| ``attention-noise`` | last layer's attention from the query position on the answer needle vs the rest | Table 3 |
| ``outliers`` | top-1 and top-10 magnitude over the median, attention logits and hidden states | Table 5 |

Results are JSON-serialisable dicts; `format_table(name, result)` renders one as a markdown table. The model is
put in eval mode for the measurement and its mode and attention implementation are restored afterwards.
"""

import math
import time

import torch
from tqdm.auto import tqdm

from .corpus import EvaluationError, python_docs_texts, split_documents
from .metrics import (
    answer_attention_share,
    attn_implementation,
    capture_attention_logits,
    lambda_statistics,
    outlier_stats,
)
from .needle import build_example, needle_specs, tokenizer_encoder

TASK_NAMES = ("ppl", "needle", "attention-noise", "outliers")


# ----------------------------------------------------------------------------------------------------------------
# helpers


def held_out_texts() -> list[str]:
    """The held-out documents of `python_docs_texts()` (`split_documents` with its defaults): the default eval text."""
    return split_documents(python_docs_texts())[1]


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """All `texts` tokenised without special tokens and concatenated, separated by EOS (or a blank line)."""
    encode = tokenizer_encoder(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    separator = [eos] if eos is not None else encode("\n\n")
    ids: list[int] = []
    for text in texts:
        ids += encode(text) + separator
    return ids


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _bos(tokenizer) -> int | None:
    return getattr(tokenizer, "bos_token_id", None)


def _progress(iterable, desc: str, progress: bool, total: int | None = None):
    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False, dynamic_ncols=True)


class _eval_mode:
    """Context manager: `model.eval()` and `torch.no_grad()` inside, the previous training flag restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        return self.model

    def __exit__(self, *exc):
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)
        return False


def _is_differential(model) -> bool:
    return getattr(model.config, "model_type", "") in ("diff_transformer", "diffllama")


def _needle_examples(tokenizer, needles, context_len, queries, samples, seed, split, texts):
    """Tokenised needle examples over the filler `texts` (default: the held-out docs)."""
    filler = token_stream(tokenizer, held_out_texts() if texts is None else texts)
    encode = tokenizer_encoder(tokenizer)
    specs = needle_specs(samples, needles, queries, seed=seed, split=split)
    return [build_example(spec, encode, filler, context_len, _bos(tokenizer)) for spec in specs]


# ----------------------------------------------------------------------------------------------------------------
# tasks


def _window_batches(tokenizer, texts, seq_len: int, batch_size: int, max_batches: int | None) -> list:
    """Batches of non-overlapping `seq_len`-token windows of `texts` (default: the held-out Python docs).

    The texts are tokenised and concatenated (EOS between documents); each window starts with BOS when the tokenizer
    has one. `max_batches` caps the number of batches (None: all).
    """
    stream = token_stream(tokenizer, held_out_texts() if texts is None else texts)
    bos = _bos(tokenizer)
    body = seq_len - (bos is not None)
    windows = [([bos] if bos is not None else []) + stream[i : i + body]
               for i in range(0, len(stream) - body + 1, body)]
    if not windows:
        raise EvaluationError(f"the texts hold {len(stream)} tokens, fewer than one window of {seq_len}")
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    return batches if max_batches is None else batches[:max_batches]


def perplexity(model, tokenizer, texts=None, seq_len=256, batch_size=4, max_batches=None, progress=True) -> dict:
    """Perplexity over non-overlapping `seq_len`-token windows of `texts` (default: the held-out Python docs).

    The texts are tokenised and concatenated (EOS between documents); each window starts with BOS when the tokenizer
    has one, and every token after the first is predicted. `max_batches` caps the number of batches (None: all).
    """
    batches = _window_batches(tokenizer, texts, seq_len, batch_size, max_batches)
    total_nll, total_tokens = 0.0, 0
    device = _device(model)
    with _eval_mode(model):
        for batch in _progress(batches, "ppl", progress):
            ids = torch.tensor(batch, device=device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                    reduction="sum")
            total_nll += nll.item()
            total_tokens += ids[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return {"task": "ppl", "perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": total_tokens,
            "seq_len": seq_len, "windows": sum(len(b) for b in batches)}


def needle_accuracy(model, tokenizer, needles=4, context_len=512, queries=1, samples=20, seed=0, split="eval",
                    texts=None, progress=True) -> dict:
    """Multi-needle retrieval accuracy (paper §3.4): the share of queries whose value tokens are all predicted.

    Each sample hides `needles` needles in a `context_len`-token haystack of held-out text, then asks `queries` of
    them. Keys come from the eval key pool (never used by `split="train"` examples). A query is correct when the
    argmax prediction of every value token is right (teacher forcing, which equals greedy decoding here).
    """
    examples = _needle_examples(tokenizer, needles, context_len, queries, samples, seed, split, texts)
    correct = total = 0
    device = _device(model)
    with _eval_mode(model):
        for ex in _progress(examples, f"needle N={needles} L={context_len}", progress):
            ids = torch.tensor([ex.input_ids], device=device)
            predicted = model(input_ids=ids).logits[0].argmax(-1).tolist()
            for start, end in ex.answer_spans:
                correct += all(predicted[p - 1] == ex.input_ids[p] for p in range(start, end))
                total += 1
    return {"task": "needle", "needles": needles, "context_len": context_len, "queries": queries,
            "samples": samples, "seed": seed, "accuracy": correct / total, "correct": correct, "total": total}


def attention_noise(model, tokenizer, needles=1, context_len=256, samples=20, seed=0, layer=-1, texts=None,
                    progress=True) -> dict:
    """Attention to the answer vs to the noise (paper Table 3), from the first query's last prompt token.

    Runs needle examples with eager attention and reads layer `layer` (default: the last). At the position that
    predicts the first value token of the first query, it sums the attention on the queried needle (its whole
    sentence, "The magic number for X is Y.") and on the rest of the haystack (filler, other needles, BOS), averaged
    over heads and samples. Diff models return their differential map here, other models their softmax maps.
    """
    examples = _needle_examples(tokenizer, needles, context_len, 1, samples, seed, "eval", texts)
    answers, noises = [], []
    device = _device(model)
    with _eval_mode(model), attn_implementation(model, "eager"):
        for ex in _progress(examples, "attention-noise", progress):
            ids = torch.tensor([ex.input_ids], device=device)
            attentions = model(input_ids=ids, output_attentions=True).attentions
            query_pos = ex.answer_spans[0][0] - 1
            row = attentions[layer][0, :, query_pos]  # (heads, keys)
            start, end = ex.needle_spans[ex.query_needles[0]]
            answer, noise = answer_attention_share(row, range(start, end), range(ex.context_end))
            answers.append(answer)
            noises.append(noise)
    answer_share, noise_share = sum(answers) / len(answers), sum(noises) / len(noises)
    return {"task": "attention-noise", "needles": needles, "context_len": context_len, "samples": samples,
            "seed": seed, "layer": layer, "maps": "differential" if _is_differential(model) else "softmax",
            "answer_share": answer_share, "noise_share": noise_share,
            "answer_to_noise": answer_share / noise_share if noise_share else float("inf")}


def activation_outliers(model, tokenizer, texts=None, seq_len=256, batch_size=4, max_batches=2, ks=(1, 10),
                        progress=True) -> dict:
    """Activation outliers (paper Table 5) over `max_batches` batches of held-out text windows.

    Attention logits: every valid (causal) entry of ``q·kᵀ/√d`` of every layer and head, captured through the
    attention interface (for V1, the per-map q1·k1 and q2·k2 logits). Hidden states: every entry of every decoder
    layer's output, i.e. the residual stream before the final norm (read by forward hooks on `model.model.layers`;
    `output_hidden_states` would mix in the normalised last state). For each, the top-1 and top-10 magnitudes and
    their ratio to the median magnitude.
    """
    batches = _window_batches(tokenizer, texts, seq_len, batch_size, max_batches)
    logits, hidden = [], []
    device = _device(model)
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise EvaluationError("outliers needs a decoder with `model.model.layers` (Llama-style causal LMs)")

    def record(module, args, output):
        output = output[0] if isinstance(output, tuple) else output
        hidden.append(output.detach().float().reshape(-1).cpu())

    hooks = [layer.register_forward_hook(record) for layer in layers]
    try:
        with _eval_mode(model), capture_attention_logits(model) as captured:
            for batch in _progress(batches, "outliers", progress):
                model(input_ids=torch.tensor(batch, device=device))
                logits += captured
                captured.clear()
    finally:
        for hook in hooks:
            hook.remove()
    return {"task": "outliers", "seq_len": seq_len, "windows": sum(len(b) for b in batches),
            "attention_logits": outlier_stats(torch.cat(logits), ks),
            "hidden_states": outlier_stats(torch.cat(hidden), ks)}


_TASKS = {"ppl": perplexity, "needle": needle_accuracy, "attention-noise": attention_noise,
          "outliers": activation_outliers}


def run_task(name: str, model, tokenizer, **options) -> dict:
    """Run task `name` (one of `TASK_NAMES`) on a causal LM and its tokenizer; options are the task's keywords.

    - ``ppl``: texts=None (held-out Python docs), seq_len=256, batch_size=4, max_batches=None
    - ``needle``: needles=4, context_len=512, queries=1, samples=20, seed=0, split="eval", texts=None
    - ``attention-noise``: needles=1, context_len=256, samples=20, seed=0, layer=-1, texts=None
    - ``outliers``: texts=None, seq_len=256, batch_size=4, max_batches=2, ks=(1, 10)

    Every task also takes progress=True (tqdm bars). Options that are None fall back to the defaults.
    """
    if name not in _TASKS:
        raise EvaluationError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    options = {k: v for k, v in options.items() if v is not None}
    check_options(**options)
    return _TASKS[name](model, tokenizer, **options)


COUNTS = ("seq_len", "batch_size", "max_batches", "needles", "context_len", "samples", "queries")


def check_options(**options) -> None:
    """Refuse a count below 1 (a window of 0 tokens, a batch count of 0 that would divide by zero), before any work:
    a caller may check the options before it loads the model."""
    for name in COUNTS:
        value = options.get(name)
        if value is not None and value < 1:
            raise EvaluationError(f"{name} is {value}: give a positive number")


def evaluate_ppl(model, tokenizer, texts=None, seq_len=256, batch_size=4, max_batches=None, progress=True) -> dict:
    """`perplexity`, with forward tokens per second and λ per layer (`lambda_statistics` over the first text's first
    `seq_len` tokens; [] for a model without differential attention)."""
    started = time.perf_counter()
    result = run_task(
        "ppl", model, tokenizer, texts=texts, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches,
        progress=progress,
    )
    result["tokens_per_second"] = result["tokens"] / (time.perf_counter() - started)
    sample = torch.tensor([tokenizer(texts[0] if texts else "def main():\n    return 0\n").input_ids[:seq_len]])
    result["lambda"] = lambda_statistics(model, sample)
    return result


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(task_name: str, result: dict) -> str:
    """A markdown table of one `run_task` result."""
    if task_name == "outliers":
        ks = sorted(int(k[3:]) for k in result["attention_logits"] if k.startswith("top") and "ratio" not in k)
        head = ["activations"] + [f"top-{k}" for k in ks] + ["median"] + [f"top-{k} / median" for k in ks]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for key, label in (("attention_logits", "attention logits"), ("hidden_states", "hidden states")):
            stats = result[key]
            cells = [label] + [_fmt(stats[f"top{k}"]) for k in ks] + [_fmt(stats["median"])]
            cells += [_fmt(stats[f"top{k}_ratio"]) for k in ks]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)
    lines = ["| metric | value |", "| --- | --- |"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in result.items() if key != "task"]
    return "\n".join(lines)

