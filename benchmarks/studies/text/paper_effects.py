"""Do the Differential Transformer paper's effects show up at small scale? Train and measure, honestly.

Trains three models from scratch with the 🤗 Trainer, at equal parameter count (within 2%) and on the same tokens:

- ``llama``: the Transformer baseline (LlamaForCausalLM),
- ``diff-v1``: DiffTransformer, the paper's differential attention,
- ``diff-v2``: DiffTransformer, DIFF V2,

with one recipe for all three (the paper's optimizer and schedule shape), for several seeds, on a mixture of
natural text (Python's reference docs and the standard library's docstrings, with a small byte-level BPE vocabulary
trained on them) and multi-needle retrieval examples (paper §3.4; train keys and eval keys are disjoint). Then it
measures, with the `modeling_diff_eval.tasks` functions that `diff-transformer eval` runs on any model:

1. held-out perplexity (``ppl``),
2. multi-needle retrieval accuracy over N ∈ {1, 2, 4, 6} and several context lengths, some longer than trained
   (``needle``),
3. attention on the answer vs on the rest of the context in the last layer (``attention-noise``),
4. top-1 / top-10 activation magnitude over the median, attention logits and hidden states (``outliers``),

and writes ``paper_effects.md`` (mean ± std over seeds, settings, machine, wall time), ``paper_effects.json`` and
PNG charts into ``--out`` (default ``benchmarks/results``).

Runs: ``python benchmarks/paper_effects.py`` (the default study: 9 runs of 700 steps, sized for about half an hour
on 2 idle CPU cores; the report states the time it took), ``--smoke`` (a few steps, for CI), ``--scale`` (a larger
study for a GPU). Training jobs run in
``--workers`` processes of one thread each, which on a small shared CPU is faster than one process with two threads.
"""

import argparse
import functools
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("llama", "diff-v1", "diff-v2")
LABELS = {"llama": "Llama (Transformer)", "diff-v1": "DiffTransformer V1", "diff-v2": "DiffTransformer V2"}
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2


@dataclass
class Settings:
    """Everything that defines a study run; written verbatim into the report."""

    vocab_size: int = 1024  # byte-level BPE trained on the training texts
    hidden_size: int = 128
    num_hidden_layers: int = 4
    heads: int = 8  # Llama's query heads (= KV heads); V1 uses the same numbers, V2 twice the query heads
    intermediate_size: int = 336  # SwiGLU width of Llama and V1 (≈ 8/3 · hidden); V2's is reduced to match params
    seq_len: int = 256  # training sequence length
    batch_size: int = 16
    steps: int = 700
    learning_rate: float = 1.5e-3
    warmup_fraction: float = 0.1  # linear warmup over this share of steps, then linear decay to min_lr_ratio
    min_lr_ratio: float = 0.04  # the paper decays 3.2e-4 -> 1.28e-5, i.e. to 4% of the peak
    adam_betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.1
    needle_fraction: float = 0.5  # share of training sequences that are needle examples (the rest: plain text)
    train_max_needles: int = 6
    eval_needles: tuple = (1, 2, 4, 6)
    eval_context_lens: tuple = (128, 256, 512, 1024)
    eval_samples: int = 40  # needle examples per (N, context length) cell, per model and seed
    noise_samples: int = 40
    noise_context_len: int = 256
    outlier_batches: int = 2
    seeds: tuple = (0, 1, 2)
    workers: int = 2
    threads_per_worker: int = 1


PRESETS = {
    "default": Settings(),
    "smoke": Settings(vocab_size=300, hidden_size=32, num_hidden_layers=2, heads=4, intermediate_size=64,
                      seq_len=192, batch_size=4, steps=4, train_max_needles=2, eval_needles=(1, 2),
                      eval_context_lens=(192, 256), eval_samples=2, noise_samples=2, noise_context_len=192,
                      outlier_batches=1, seeds=(0,), workers=1, threads_per_worker=2),
    "scale": Settings(vocab_size=4096, hidden_size=512, num_hidden_layers=8, heads=8, intermediate_size=1365,
                      seq_len=1024, batch_size=32, steps=5000, learning_rate=6e-4, eval_context_lens=(512, 1024,
                      2048, 4096), eval_samples=100, noise_samples=100, noise_context_len=1024, outlier_batches=4,
                      workers=1, threads_per_worker=os.cpu_count() or 1),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true",
                      help="smallest settings (tiny models, a few steps, 1 seed): checks the pipeline, for CI")
    size.add_argument("--scale", action="store_true",
                      help="a larger study (512-wide, 8 layers, 1024-token context, 5000 steps) meant for a GPU")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds (0..n-1) per model; default 3 (1 with --smoke)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: the preset's)")
    parser.add_argument("--workers", type=int, default=None,
                        help="training processes run in parallel, one job (model, seed) each (default: the preset's)")
    parser.add_argument("--lr-sweep", type=float, nargs="+", metavar="LR", default=None,
                        help="the learning-rate question: train the --models (default: Llama and V1) at each of "
                             "these peak learning rates, and write paper_effects_lr_sweep.md/.json/.png comparing "
                             "every model at its own best rate (by held-out perplexity)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=None,
                        help="models to train (default: all three; with --lr-sweep: llama diff-v1)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a finished study's JSON (e.g. benchmarks/results/paper_effects.json): its runs with "
                             "the same settings (any learning rate) are taken instead of retrained, and the report "
                             "names them")
    parser.add_argument("--report-only", action="store_true",
                        help="do not train: write the report from the runs finished so far by an interrupted study "
                             "(OUT/paper_effects.partial.json), saying which runs are missing")
    parser.add_argument("--note", default="",
                        help="with --report-only: one line of context added to the report (e.g. the machine load "
                             "observed during a run that did not record it)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for paper_effects.md/.json and the PNG charts (default: benchmarks/results)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# data


@functools.lru_cache(maxsize=1)
def corpus():
    """(train texts, held-out texts). Held-out = the held-out Python docs that `run_task` evaluates by default."""
    from modeling_diff_eval.corpus import python_docs_texts, split_documents, stdlib_docstrings

    docs_train, docs_held_out = split_documents(python_docs_texts())
    strings_train, _ = split_documents(stdlib_docstrings())
    return docs_train + strings_train, docs_held_out


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a 🤗 fast tokenizer (<pad>=0, <s>=1, </s>=2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def training_sequences(tokenizer, train_texts: list[str], settings: Settings, seed: int) -> list[dict]:
    """The `steps · batch_size` training sequences of one seed, the same for every model.

    Text sequences are consecutive `seq_len`-token windows (BOS first) of the training texts, taken from a random
    start. Needle sequences hold N ∈ [1, train_max_needles] needles with train-pool keys in a haystack of training
    text, followed by queries for all N needles in random order; they are right-padded to `seq_len` (padding is
    not trained on). Loss is the plain causal-LM loss on every non-pad token of both kinds.
    """
    from modeling_diff_eval.needle import build_example, needle_specs, tokenizer_encoder
    from modeling_diff_eval.tasks import token_stream

    rng = random.Random(f"train:{seed}")
    stream = token_stream(tokenizer, train_texts)
    encode = functools.lru_cache(maxsize=None)(tokenizer_encoder(tokenizer))
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    total = settings.steps * settings.batch_size
    query_room = 1 + settings.train_max_needles * 16  # newline + per query ~14 tokens (prefix ~10, value ~4, ".")
    sequences = []
    position = rng.randrange(len(stream))
    for index in range(total):
        if rng.random() < settings.needle_fraction:
            n = rng.randint(1, settings.train_max_needles)
            spec = needle_specs(1, n, n, seed=rng.randrange(2**31), split="train")[0]
            context_len = settings.seq_len - query_room
            ids = build_example(spec, encode, stream, context_len, bos).input_ids[: settings.seq_len]
        else:
            body = settings.seq_len - 1
            if position + body > len(stream):
                position = 0
            ids = [bos] + stream[position : position + body]
            position += body
        labels = ids + [-100] * (settings.seq_len - len(ids))
        sequences.append({"input_ids": ids + [pad] * (settings.seq_len - len(ids)), "labels": labels})
    return sequences


# ----------------------------------------------------------------------------------------------------------------
# models


def model_configs(settings: Settings, vocab_size: int) -> dict:
    """The three configs: Llama; V1 with Llama's numbers (the paper's heads: half as many differential heads, each
    twice as wide in value); V2 in DIFF V2's layout (twice Llama's query heads, Llama's KV heads and o_proj width)
    with its SwiGLU width reduced so that its parameter count matches Llama's (the extra query projection costs
    one hidden² matrix per layer)."""
    from transformers import LlamaConfig

    import modeling_diff  # noqa: F401  (registers the Auto classes)
    from modeling_diff import DiffTransformerConfig

    head_dim = settings.hidden_size // settings.heads
    common = dict(vocab_size=vocab_size, hidden_size=settings.hidden_size,
                  num_hidden_layers=settings.num_hidden_layers, head_dim=head_dim,
                  max_position_embeddings=max(settings.eval_context_lens) * 2, tie_word_embeddings=True,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 10000.0})
    llama = LlamaConfig(num_attention_heads=settings.heads, num_key_value_heads=settings.heads,
                        intermediate_size=settings.intermediate_size, **common)
    v1 = DiffTransformerConfig(diff_version=1, num_attention_heads=settings.heads, num_key_value_heads=settings.heads,
                               intermediate_size=settings.intermediate_size, **common)
    # V2: extra parameters per layer = hidden · (2·heads·head_dim − heads·head_dim) + hidden · heads (λ projection);
    # each unit of SwiGLU width costs 3 · hidden.
    extra = settings.hidden_size * settings.heads * head_dim + settings.hidden_size * settings.heads
    v2_intermediate = settings.intermediate_size - round(extra / (3 * settings.hidden_size))
    v2 = DiffTransformerConfig(diff_version=2, num_attention_heads=2 * settings.heads,
                               num_key_value_heads=settings.heads, intermediate_size=v2_intermediate, **common)
    return {"llama": llama, "diff-v1": v1, "diff-v2": v2}


def build_model(name: str, config, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# one job: train one model for one seed, then measure it


def paper_schedule(optimizer, steps: int, warmup: int, min_lr_ratio: float):
    """Linear warmup for `warmup` steps, then linear decay to `min_lr_ratio` of the peak at `steps` (the paper's)."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 1.0 - (1.0 - min_lr_ratio) * progress

    return LambdaLR(optimizer, factor)


def study_trainer(model, data, settings, learning_rate: float, seed: int, output_dir: str, callbacks: list,
                  quiet: bool, sequential: bool = False):
    """The 🤗 Trainer with the studies' one recipe, for any model: AdamW with `settings.adam_betas` and
    `settings.weight_decay`, gradient clipping 1.0, the paper's schedule (`paper_schedule`), fp32, `settings.steps`
    steps of `settings.batch_size`. `sequential` feeds the data in its stored order instead of shuffled by `seed`."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    class StudyTrainer(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            if sequential:
                return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)
            return super()._get_train_sampler(train_dataset)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = paper_schedule(optimizer or self.optimizer, num_training_steps,
                                                   max(1, round(settings.warmup_fraction * num_training_steps)),
                                                   settings.min_lr_ratio)
            return self.lr_scheduler

    args = TrainingArguments(
        output_dir=output_dir, max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=learning_rate, adam_beta1=settings.adam_betas[0], adam_beta2=settings.adam_betas[1],
        weight_decay=settings.weight_decay, max_grad_norm=1.0, logging_steps=max(1, settings.steps // 20),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=quiet, dataloader_num_workers=0,
    )
    return StudyTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def run_job(job: dict, queue=None) -> dict:
    """Train `job["model"]` with `job["seed"]` and run every measurement; returns a JSON-serialisable dict."""
    import torch
    from modeling_diff_eval.tasks import run_task
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    settings = Settings(**job["settings"])
    torch.set_num_threads(settings.threads_per_worker)
    name, seed = job["model"], job["seed"]
    tag = f"{name} seed {seed}"

    def report(kind, value=None):
        if queue is not None:
            queue.put((tag, kind, value))

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=job["tokenizer_file"], pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>")
    train_texts, _ = corpus()
    config = model_configs(settings, len(tokenizer))[name]
    model = build_model(name, config, seed)
    data = training_sequences(tokenizer, train_texts, settings, seed)

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            report("step", 1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                report("loss", logs["loss"])

    started = time.time()
    trainer = study_trainer(model, data, settings, settings.learning_rate, seed, job["scratch"], [Progress()],
                            quiet=queue is not None)
    trainer.remove_callback(PrinterCallback)  # progress goes to the study's own bar
    history = trainer.train()
    train_seconds = time.time() - started
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    report("phase", "eval")
    started = time.time()
    model.eval()
    results = {"model": name, "seed": seed, "learning_rate": settings.learning_rate,
               "parameters": count_parameters(model),
               "train_loss_last": losses[-1] if losses else None, "train_loss_curve": losses,
               "train_seconds": train_seconds, "train_tokens": settings.steps * settings.batch_size * settings.seq_len,
               "train_loss_mean": history.training_loss}
    results["ppl"] = run_task("ppl", model, tokenizer, seq_len=settings.seq_len, progress=False)["perplexity"]
    needle = {}
    for n in settings.eval_needles:
        queries = 1 if n == 1 else 2  # paper Table 2: R = 1 for N = 1, R = 2 otherwise
        for length in settings.eval_context_lens:
            out = run_task("needle", model, tokenizer, needles=n, context_len=length, queries=queries,
                           samples=settings.eval_samples, seed=1000 + seed, progress=False)
            needle[f"{n}/{length}"] = out["accuracy"]
    results["needle"] = needle
    noise = run_task("attention-noise", model, tokenizer, needles=1, context_len=settings.noise_context_len,
                     samples=settings.noise_samples, seed=2000 + seed, progress=False)
    results["attention"] = {k: noise[k] for k in ("answer_share", "noise_share", "answer_to_noise", "maps")}
    outliers = run_task("outliers", model, tokenizer, seq_len=settings.seq_len, max_batches=settings.outlier_batches,
                        progress=False)
    results["outliers"] = {kind: {k: outliers[kind][k] for k in ("top1_ratio", "top10_ratio", "top1", "median")}
                           for kind in ("attention_logits", "hidden_states")}
    results["eval_seconds"] = time.time() - started
    report("done", None)
    return results


# ----------------------------------------------------------------------------------------------------------------
# aggregation, report, charts


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


RATIO_LABEL = "answer / noise attention ratio"
NULL_ACCURACY = 0.05  # below this best-cell accuracy, the needle rows are reported as a null result


def metric_rows(results: list[dict], settings: Settings) -> list[tuple[str, str, dict]]:
    """(metric label, better direction, {model: [per-seed values]}) for every reported metric."""
    by_model = {m: [r for r in results if r["model"] == m] for m in MODELS}

    def collect(get):
        return {m: [get(r) for r in rs] for m, rs in by_model.items()}

    rows = [("held-out perplexity", "lower", collect(lambda r: r["ppl"])),
            ("final training loss", "lower", collect(lambda r: r["train_loss_last"]))]
    for n in settings.eval_needles:
        rows.append((f"needle accuracy N={n} (mean over lengths)", "higher",
                     collect(lambda r, n=n: statistics.fmean(r["needle"][f"{n}/{L}"]
                                                             for L in settings.eval_context_lens))))
    for length in settings.eval_context_lens:
        marker = " (longer than trained)" if length > settings.seq_len else ""
        rows.append((f"needle accuracy L={length}{marker} (mean over N)", "higher",
                     collect(lambda r, L=length: statistics.fmean(r["needle"][f"{n}/{L}"]
                                                                  for n in settings.eval_needles))))
    rows += [
        ("attention on answer (last layer)", "higher", collect(lambda r: r["attention"]["answer_share"])),
        ("attention on noise context (last layer)", "lower", collect(lambda r: r["attention"]["noise_share"])),
        (RATIO_LABEL, "higher", collect(lambda r: r["attention"]["answer_to_noise"])),
        ("attention logits top-1 / median", "lower",
         collect(lambda r: r["outliers"]["attention_logits"]["top1_ratio"])),
        ("attention logits top-10 / median", "lower",
         collect(lambda r: r["outliers"]["attention_logits"]["top10_ratio"])),
        ("hidden states top-1 / median", "lower", collect(lambda r: r["outliers"]["hidden_states"]["top1_ratio"])),
        ("hidden states top-10 / median", "lower", collect(lambda r: r["outliers"]["hidden_states"]["top10_ratio"])),
    ]
    return rows


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    digits = 3 if abs(mean) < 10 else 1
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_table(results: list[dict], settings: Settings) -> tuple[str, list[dict]]:
    """The markdown table (mean ± std over seeds) and, per metric, which model is best by mean."""
    lines = ["| metric | better | " + " | ".join(LABELS[m] for m in MODELS) + " | best (by mean) |",
             "| --- | --- |" + " --- |" * len(MODELS) + " --- |"]
    verdicts = []
    for label, better, values in metric_rows(results, settings):
        stats = {m: mean_std(values[m]) for m in MODELS}
        means = {m: s[0] for m, s in stats.items() if not math.isnan(s[0])}
        if label == RATIO_LABEL:  # only models whose every run has a positive noise share are ranked
            invalid = {m for m in MODELS if not all(ratio_is_meaningful(r) for r in results if r["model"] == m)}
            means = {m: v for m, v in means.items() if m not in invalid}
            cells = [_fmt(*stats[m]) + (" †" if m in invalid else "") for m in MODELS]
        best = (min if better == "lower" else max)(means, key=means.get) if means else None
        # "clear" when the best mean beats every other mean by more than the sum of the two stds
        clear = best is not None and all(
            abs(means[best] - means[m]) > stats[best][1] + stats[m][1] for m in means if m != best)
        verdict = "—" if best is None else (LABELS[best] + ("" if clear else " (within spread)"))
        if best is not None and len(means) > 1 and len(set(round(v, 6) for v in means.values())) == 1:
            verdict = "tie"
        elif best is not None and len(means) == 1:
            verdict = LABELS[best] + " (the only model ranked)"
        if label != RATIO_LABEL:
            cells = [_fmt(*stats[m]) for m in MODELS]
        lines.append(f"| {label} | {better} | " + " | ".join(cells) + f" | {verdict} |")
        verdicts.append({"metric": label, "better": better, "best": best, "clear": clear,
                         "means": means})
    return "\n".join(lines), verdicts


def ratio_is_meaningful(result: dict) -> bool:
    """The answer/noise ratio is a signal-to-noise ratio only when the noise share is positive: a differential row
    can put net negative attention on the context, and the ratio of two negative sums is not evidence of anything."""
    return result["attention"]["noise_share"] > 0


def compare(results: list[dict], get, model: str, better: str, valid=None) -> tuple[str, float, float]:
    """How `model` does against Llama on one metric: ("better" | "worse" | "no clear difference", its mean, Llama's).

    A difference counts only when the means differ by more than the sum of the two standard deviations over seeds.
    With `valid` given, the verdict is "not comparable" when any run of either model fails it.
    """
    ours = mean_std([get(r) for r in results if r["model"] == model])
    base = mean_std([get(r) for r in results if r["model"] == "llama"])
    if math.isnan(ours[0]) or math.isnan(base[0]):
        return "not measured", ours[0], base[0]
    if valid is not None and not all(valid(r) for r in results if r["model"] in (model, "llama")):
        return "not comparable (noise share ≤ 0)", ours[0], base[0]
    if abs(ours[0] - base[0]) <= ours[1] + base[1]:
        return "no clear difference", ours[0], base[0]
    wins = ours[0] < base[0] if better == "lower" else ours[0] > base[0]
    return ("better" if wins else "worse"), ours[0], base[0]


def findings(results: list[dict], settings: Settings) -> list[str]:
    """One bullet per paper claim, stating for V1 and V2 whether they beat Llama here (computed, not written)."""
    long_lens = [L for L in settings.eval_context_lens if L > settings.seq_len]
    claims = [
        ("lower held-out perplexity", "lower", lambda r: r["ppl"], "{:.2f}"),
        ("higher multi-needle accuracy (mean over every N and length)", "higher",
         lambda r: statistics.fmean(r["needle"].values()), "{:.3f}"),
        (f"higher multi-needle accuracy with N = {max(settings.eval_needles)} needles (mean over lengths)", "higher",
         lambda r: statistics.fmean(r["needle"][f"{max(settings.eval_needles)}/{L}"]
                                    for L in settings.eval_context_lens), "{:.3f}"),
    ]
    if long_lens:
        claims.append((f"higher accuracy beyond the training length ({', '.join(map(str, long_lens))} tokens)",
                       "higher", lambda r: statistics.fmean(r["needle"][f"{n}/{L}"] for n in settings.eval_needles
                                                            for L in long_lens), "{:.3f}"))
    claims += [
        ("more attention on the answer span (last layer)", "higher", lambda r: r["attention"]["answer_share"],
         "{:.3f}"),
        ("less attention on the noise context (last layer)", "lower", lambda r: r["attention"]["noise_share"],
         "{:.3f}"),
        ("a higher answer-to-noise attention ratio (last layer)", "higher",
         lambda r: r["attention"]["answer_to_noise"], "{:.3f}", ratio_is_meaningful),
        ("smaller attention-logit outliers (top-1 / median)", "lower",
         lambda r: r["outliers"]["attention_logits"]["top1_ratio"], "{:.1f}"),
        ("smaller hidden-state outliers (top-1 / median)", "lower",
         lambda r: r["outliers"]["hidden_states"]["top1_ratio"], "{:.1f}"),
    ]
    cell_means = [statistics.fmean(r["needle"][cell] for r in results if r["model"] == m)
                  for m in MODELS for cell in results[0]["needle"] if any(r["model"] == m for r in results)]
    retrieval_null = max(cell_means, default=0.0) < NULL_ACCURACY
    lines = []
    for claim, better, get, fmt, *valid in claims:
        parts = []
        for model in ("diff-v1", "diff-v2"):
            verdict, ours, base = compare(results, get, model, better, *valid)
            if retrieval_null and "accuracy" in claim:
                verdict = "no evidence either way (retrieval did not emerge)"
            parts.append(f"{LABELS[model]}: **{verdict}** ({fmt.format(ours)} vs {fmt.format(base)})")
        lines.append(f"- Paper: {claim}. Here, against Llama — " + "; ".join(parts) + ".")
    if retrieval_null:
        queries = settings.eval_samples * 2  # R = 2 for N > 1
        lines.append(f"- **Retrieval did not emerge in any model:** the best (N, length) cell averages "
                     f"{max(cell_means, default=0.0):.1%} over seeds (at most a few hits out of {queries} queries per "
                     f"cell and seed; below the {NULL_ACCURACY:.0%} threshold this report treats as no retrieval). "
                     "The needle rows are a null result at this scale, not evidence for or against the paper.")
    v1_ppl = mean_std([r["ppl"] for r in results if r["model"] == "diff-v1"])
    base_ppl = mean_std([r["ppl"] for r in results if r["model"] == "llama"])
    if not math.isnan(v1_ppl[0]) and v1_ppl[0] - base_ppl[0] > v1_ppl[1] + base_ppl[1]:
        lines.append("- **V1 fits more slowly than Llama here** (higher perplexity at the same tokens). Why was not "
                     "investigated; candidates are V1's four differential heads (Llama has eight heads, V2 eight "
                     "output heads over sixteen query maps), its per-head RMSNorm and (1 − λ_init) output scale, "
                     "and the λ re-parameterisation, all of which change early optimisation; the paper's claim "
                     "concerns models trained about 10⁵ times longer.")
    return lines


DISCUSSION = """How to read this. The paper's effects were measured on 3B-parameter models trained on 1T tokens;
these models have {params} parameters and each sees {tokens} token positions, so this study tests whether the effects
already appear at toy scale, not whether the paper is right. Where a Diff model does not beat Llama above, these are
the likely reasons (hypotheses, not tested here); none of them was addressed by tuning one model more than another:

- **Scale and tokens.** Outliers (massive activations, attention sinks) and attention noise grow with training; a
  short run from a small initialisation has few outliers in any architecture, so there is little noise to cancel
  and little to win. Differences in perplexity at this budget are dominated by how fast each model fits.
- **The task.** Retrieval here is an exact-copy task (the query repeats the needle's prefix), which small models
  solve with induction heads once they form; whether they form in so few steps is closer to a threshold effect
  than to a smooth difference, which makes the seed spread large. Keys at evaluation are never seen in training.
- **Longer than trained.** No model uses position interpolation, so accuracy beyond the training length measures
  plain RoPE extrapolation for all three.
- **What the attention shares mean.** A differential row sums to 1 − λ (V1) or 1 − sigmoid(λ) (V2), not to 1, and
  can hold negative entries, so its shares are on a different scale from Llama's softmax shares. The ratio of the
  answer share to the noise share is comparable only where the noise share is positive (see † in the table).
- **One recipe.** The optimiser and schedule are the paper's, at one peak learning rate for all three models; a
  different learning rate could favour a different model, and was deliberately not searched per model.
- **Seeds.** With {seeds} seed(s), only differences larger than the seed spread are called "better" or "worse".
"""


def needle_grid_table(results: list[dict], settings: Settings) -> str:
    """Accuracy per (N, context length), mean over seeds, one column per model."""
    lines = ["| N | context length | " + " | ".join(LABELS[m] for m in MODELS) + " |",
             "| --- | --- |" + " --- |" * len(MODELS)]
    for n in settings.eval_needles:
        for length in settings.eval_context_lens:
            cells = [_fmt(*mean_std([r["needle"][f"{n}/{length}"] for r in results if r["model"] == m]))
                     for m in MODELS]
            marker = "*" if length > settings.seq_len else ""
            lines.append(f"| {n} | {length}{marker} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def make_charts(results: list[dict], settings: Settings, out: Path, prefix: str) -> list[str]:
    """Three PNGs: needle accuracy by N and by context length; attention shares; outlier ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"llama": "tab:gray", "diff-v1": "tab:blue", "diff-v2": "tab:orange"}
    files = []

    def per_model(get):
        return {m: mean_std([get(r) for r in results if r["model"] == m]) for m in MODELS}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, xs, key_of, xlabel in (
        (axes[0], settings.eval_needles, lambda r, x: statistics.fmean(
            r["needle"][f"{x}/{L}"] for L in settings.eval_context_lens), "needles N (mean over context lengths)"),
        (axes[1], settings.eval_context_lens, lambda r, x: statistics.fmean(
            r["needle"][f"{n}/{x}"] for n in settings.eval_needles), "context length (mean over N)"),
    ):
        for m in MODELS:
            stats = [mean_std([key_of(r, x) for r in results if r["model"] == m]) for x in xs]
            axis.errorbar([str(x) for x in xs], [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o",
                          capsize=3, label=LABELS[m], color=colors[m])
        axis.set_xlabel(xlabel)
        axis.set_ylabel("retrieval accuracy")
        axis.set_ylim(-0.05, 1.05)
        axis.grid(alpha=0.3)
    axes[1].axvline(str(settings.seq_len) if settings.seq_len in settings.eval_context_lens else 0, color="k",
                    ls=":", lw=1, label="training length")
    axes[0].legend()
    fig.suptitle("Multi-needle retrieval (mean ± std over seeds)")
    fig.tight_layout()
    files.append(f"{prefix}_needle.png")
    fig.savefig(out / files[-1], dpi=120)
    plt.close(fig)

    fig, axis = plt.subplots(figsize=(6, 4))
    width = 0.38
    for i, (key, label) in enumerate((("answer_share", "answer span"), ("noise_share", "noise context"))):
        stats = per_model(lambda r, key=key: r["attention"][key])
        axis.bar([j + (i - 0.5) * width for j in range(len(MODELS))], [stats[m][0] for m in MODELS], width,
                 yerr=[stats[m][1] for m in MODELS], capsize=3, label=label)
    axis.set_xticks(range(len(MODELS)), [LABELS[m] for m in MODELS])
    axis.set_ylabel("attention share (last layer)")
    axis.set_title(f"Attention from the query, N=1, context {settings.noise_context_len}")
    axis.legend()
    axis.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    files.append(f"{prefix}_attention.png")
    fig.savefig(out / files[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, kind, title in ((axes[0], "attention_logits", "attention logits"),
                              (axes[1], "hidden_states", "hidden states")):
        for i, ratio in enumerate(("top1_ratio", "top10_ratio")):
            stats = per_model(lambda r, kind=kind, ratio=ratio: r["outliers"][kind][ratio])
            axis.bar([j + (i - 0.5) * width for j in range(len(MODELS))], [stats[m][0] for m in MODELS], width,
                     yerr=[stats[m][1] for m in MODELS], capsize=3, label=ratio.replace("_ratio", " / median"))
        axis.set_xticks(range(len(MODELS)), [LABELS[m] for m in MODELS], fontsize=8)
        axis.set_title(title)
        axis.grid(alpha=0.3, axis="y")
        axis.legend()
    fig.suptitle("Activation outliers: k-th largest magnitude / median (lower = fewer outliers)")
    fig.tight_layout()
    files.append(f"{prefix}_outliers.png")
    fig.savefig(out / files[-1], dpi=120)
    plt.close(fig)
    return files


def machine_description() -> str:
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} logical CPUs, device: {device}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")


def write_report(results, settings, params, wall_seconds, out: Path, prefix: str, preset: str, command: str,
                 missing: list[str] = (), rendered_from: str | None = None, load_samples=None, note: str = ""):
    """Write `prefix`.md, `prefix`.json and the charts; `missing` names runs that did not finish (partial report)."""
    table, verdicts = results_table(results, settings)
    charts = make_charts(results, settings, out, prefix)
    (out / f"{prefix}.json").write_text(json.dumps({"settings": asdict(settings), "parameters": params,
                                                    "wall_seconds": wall_seconds, "preset": preset,
                                                    "command": command, "load_samples": load_samples,
                                                    "note": note, "results": results}, indent=1))
    head_dim = settings.hidden_size // settings.heads
    configs = model_configs(settings, settings.vocab_size)
    tokens = settings.steps * settings.batch_size * settings.seq_len
    train_minutes = statistics.fmean(r["train_seconds"] for r in results) / 60
    lines = [
        "# Paper effects at small scale",
        "",
        f"Produced by `{command}` (preset: **{preset}**) — every number below comes from that run of "
        "`benchmarks/paper_effects.py`; raw per-seed values are in "
        f"[`{prefix}.json`]({prefix}.json).",
        "",
        f"- **Machine:** {machine_description()}.",
        "- **Load:** " + (f"1-minute load average of the machine during the run (sampled every 30 s): mean "
                          f"{statistics.fmean(load_samples):.1f}, max {max(load_samples):.1f}, on "
                          f"{os.cpu_count()} cores (the machine is shared)." if load_samples else
                          "not recorded by the script for this run (the machine is shared)."),
        *([f"- **Note:** {note}"] if note else []),
        *([f"- Report re-rendered without training by `--report-only` from the measurements saved in "
            f"`{rendered_from}` (the measurement code is unchanged; only the report text was regenerated)."]
          if rendered_from else []),
        *([f"- **INCOMPLETE:** the study was stopped before these runs finished: {', '.join(missing)}. The table "
            "below covers only the finished runs."] if missing else []),
        f"- **Wall time:** {wall_seconds / 60:.1f} min for the "
        f"{'whole study' if not missing else 'runs finished so far'} ({len(results)} training runs in "
        f"{settings.workers} worker process(es) × {settings.threads_per_worker} thread(s); "
        f"{train_minutes:.1f} min of training per run on average).",
        "",
        "## Results (mean ± std over seeds " + ", ".join(str(s) for s in sorted({r["seed"] for r in results})) + ")",
        "",
        table,
        "",
        "\"best (by mean)\" names the model with the best mean; \"(within spread)\" means its lead over some other "
        "model is smaller than the sum of their two standard deviations, i.e. not a clear win at this number of "
        "seeds. † = the noise share was ≤ 0 in at least one run (a differential row can put net negative attention "
        "on the context), so the ratio is not a signal-to-noise ratio there and that model is not ranked on it.",
        "",
        "Needle accuracy per cell (mean ± std over seeds; * = longer than the training length "
        f"{settings.seq_len}):",
        "",
        needle_grid_table(results, settings),
        "",
        f"![needle accuracy]({charts[0]})",
        f"![attention shares]({charts[1]})",
        f"![outlier ratios]({charts[2]})",
        "",
        "## Findings (computed from the table: \"better\"/\"worse\" only when the means differ by more than the "
        "sum of the two standard deviations)",
        "",
        *findings(results, settings),
        "",
        "## Discussion",
        "",
        DISCUSSION.format(params=f"{params['llama'] / 1e6:.2f}M", tokens=f"{tokens:,}",
                          seeds=len(settings.seeds)),
        "## Settings",
        "",
        "| model | layout | parameters |",
        "| --- | --- | --- |",
    ]
    for m in MODELS:
        c = configs[m]
        layout = (f"{c.num_attention_heads} query heads, {c.num_key_value_heads} KV heads, head_dim {head_dim}, "
                  f"SwiGLU {c.intermediate_size}")
        lines.append(f"| {LABELS[m]} | {layout} | {params[m]:,} ({(params[m] / params['llama'] - 1) * 100:+.2f}% vs "
                     "Llama) |")
    lines += [
        "",
        f"- All models: hidden {settings.hidden_size}, {settings.num_hidden_layers} layers, tied embeddings, RoPE θ "
        f"10000, vocabulary {settings.vocab_size} (byte-level BPE trained with `tokenizers` on the training texts).",
        "- Head counts follow the paper: V1 keeps the baseline's query-head count, i.e. half as many differential "
        "heads, each with a value twice as wide (λ_init = 0.8 − 0.6·exp(−0.3·layer)). V2 uses DIFF V2's own "
        "layout (twice the baseline's query heads, the baseline's KV heads and o_proj width); its extra query "
        "projection is paid for by a narrower SwiGLU, so that all three are within 2% of each other in parameters.",
        f"- Training: {settings.steps} steps × batch {settings.batch_size} × {settings.seq_len} tokens = {tokens:,} "
        "token positions per model (the same sequences, in the same order, for every model of a seed). "
        f"{settings.needle_fraction:.0%} of the sequences are needle examples (N ∈ 1..{settings.train_max_needles} "
        "needles with keys from the train pool in training text, then a query for each needle), the rest plain "
        "text windows; causal-LM loss on all non-pad tokens.",
        f"- Optimiser (the paper's, for all three): AdamW β = {tuple(settings.adam_betas)}, weight decay "
        f"{settings.weight_decay}, peak learning rate {settings.learning_rate:g}, linear warmup over "
        f"{settings.warmup_fraction:.0%} of the steps, then linear decay to {settings.min_lr_ratio:.0%} of the peak "
        "(the paper: 3.2e-4 → 1.28e-5); gradient clipping 1.0; fp32. The learning rate is higher than the paper's "
        "because these models are ~3000× smaller; it was not tuned for any one model.",
        "- Text: training = Python's reference docs (`pydoc_data.topics`, 90% of the topics) + stdlib docstrings "
        "(90% of the modules); held-out = the other 10% of the topics (`modeling_diff_eval.tasks.held_out_texts`).",
        f"- Needle evaluation: N ∈ {list(settings.eval_needles)}, R = 1 query for N = 1 and 2 otherwise (paper "
        f"Table 2), context lengths {list(settings.eval_context_lens)} tokens of held-out text, "
        f"{settings.eval_samples} examples per cell and seed, keys from the eval pool (disjoint from training "
        "keys); a query counts when every value token is the argmax prediction.",
        f"- Attention noise: N = 1, context {settings.noise_context_len}, {settings.noise_samples} examples; last "
        "layer, from the position that predicts the answer; share on the queried needle's sentence vs on the rest "
        "of the haystack, averaged over heads (Diff models: the differential map, which can be negative and whose "
        "rows sum to 1 − λ rather than 1).",
        f"- Outliers: {settings.outlier_batches} batch(es) of 4 held-out windows of {settings.seq_len} tokens; all "
        "valid attention logits q·k/√d of every layer and head (V1: each map's own logits), all entries of every "
        "decoder layer's output (the residual stream, before the final norm); top-k = the k-th largest magnitude.",
        "- `--scale` (a larger run for a GPU) was not run here.",
        "",
    ]
    (out / f"{prefix}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return verdicts


# ----------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    preset = "smoke" if args.smoke else "scale" if args.scale else "default"
    settings = PRESETS[preset]
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(range(args.seeds)))
    if args.steps is not None:
        settings = replace(settings, steps=args.steps)
    if args.workers is not None:
        settings = replace(settings, workers=args.workers)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out
    if args.report_only:
        return report_from_partial(out, args.note)
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / ".paper_effects_scratch"
    scratch.mkdir(exist_ok=True)
    started = time.time()

    train_texts, _ = corpus()
    tokenizer = train_tokenizer(train_texts, settings.vocab_size)
    tokenizer_file = str(scratch / "tokenizer.json")
    tokenizer.backend_tokenizer.save(tokenizer_file)
    params = {}
    for name, config in model_configs(settings, len(tokenizer)).items():
        params[name] = count_parameters(build_model(name, config, 0))
    spread = max(params.values()) / min(params.values()) - 1
    assert spread <= 0.02, f"parameter counts differ by {spread:.1%}: {params}"
    print("parameters: " + ", ".join(f"{m} {p:,}" for m, p in params.items()) + f" (spread {spread:.2%})")

    command = "python benchmarks/paper_effects.py" + "".join(f" {a}" for a in (argv if argv is not None else
                                                                                sys.argv[1:]))
    state = {"settings": asdict(settings), "parameters": params, "preset": preset, "command": command,
             "started": started, "load_samples": []}
    if args.lr_sweep:
        return lr_sweep(args, settings, state, tokenizer_file, scratch, out)
    models = args.models or MODELS
    jobs = [{"model": m, "seed": s, "settings": asdict(settings), "tokenizer_file": tokenizer_file,
             "scratch": str(scratch / f"{m}-{s}")} for s in settings.seeds for m in models]
    results = run_jobs(run_job, jobs, settings.workers, len(jobs) * settings.steps,
                       out / "paper_effects.partial.json", state)
    wall = time.time() - started
    (out / "paper_effects.partial.json").unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)  # the tokenizer file and the Trainer's empty output folders
    verdicts = write_report(results, settings, params, wall, out, "paper_effects", preset, command,
                            load_samples=state["load_samples"])
    for v in verdicts:
        print(f"{v['metric']}: best {v['best']}{'' if v['clear'] else ' (within spread)'}")
    print(f"wrote {out / 'paper_effects.md'} in {wall / 60:.1f} min")
    return results


def lr_sweep(args, settings: Settings, state: dict, tokenizer_file: str, scratch: Path, out: Path) -> list[dict]:
    """Train `args.models` (default Llama and V1) at every rate of `args.lr_sweep` and seed; write the sweep report.

    Runs found in `args.reuse` with the same settings apart from the learning rate are taken, not retrained.
    """
    models = args.models or ("llama", "diff-v1")
    reused = []
    if args.reuse:
        earlier = json.loads(args.reuse.read_text())
        same = {k: v for k, v in earlier["settings"].items() if k not in ("learning_rate", "seeds", "workers")} == {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()
            if k not in ("learning_rate", "seeds", "workers")}
        if not same:
            raise SystemExit(f"error: {args.reuse} was run with other settings; drop --reuse or match its settings")
        for r in earlier["results"]:
            r = dict(r, learning_rate=r.get("learning_rate", earlier["settings"]["learning_rate"]),
                     reused_from=args.reuse.name)
            if r["model"] in models and r["seed"] in settings.seeds and any(
                    math.isclose(r["learning_rate"], lr) for lr in args.lr_sweep):
                reused.append(r)
    done = {(r["model"], r["seed"], round(r["learning_rate"], 12)) for r in reused}
    jobs = [{"model": m, "seed": s, "settings": asdict(replace(settings, learning_rate=lr)),
             "tokenizer_file": tokenizer_file, "scratch": str(scratch / f"{m}-{s}-{lr:g}")}
            for lr in args.lr_sweep for s in settings.seeds for m in models if (m, s, round(lr, 12)) not in done]
    state.update(learning_rates=list(args.lr_sweep), models=list(models), reused=len(reused))
    print(f"{len(jobs)} runs to train, {len(reused)} reused from {args.reuse}")
    results = reused + run_jobs(run_job, jobs, settings.workers, len(jobs) * settings.steps,
                                out / "paper_effects_lr_sweep.partial.json", state)
    state = {k: v for k, v in state.items() if not k.startswith("_")}
    state.update(results=results, wall_seconds=time.time() - state["started"])
    (out / "paper_effects_lr_sweep.json").write_text(json.dumps(state, indent=1))
    write_sweep_report(state, out)
    (out / "paper_effects_lr_sweep.partial.json").unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def write_sweep_report(state: dict, out: Path) -> Path:
    """paper_effects_lr_sweep.md and .png: perplexity per model and rate, and each model at its own best rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["settings"].items()})
    results, rates, models = state["results"], state["learning_rates"], state["models"]

    def ppl(model, rate):
        return mean_std([r["ppl"] for r in results if r["model"] == model and math.isclose(r["learning_rate"], rate)])

    best = {m: min(rates, key=lambda rate, m=m: ppl(m, rate)[0]) for m in models}
    lines = ["| model | " + " | ".join(f"lr {rate:g}" for rate in rates) + " |", "| --- |" + " --- |" * len(rates)]
    for m in models:
        cells = [_fmt(*ppl(m, rate)) for rate in rates]
        lines.append(f"| {LABELS[m]} | " + " | ".join(f"**{c}**" if math.isclose(rate, best[m]) else c
                                                     for c, rate in zip(cells, rates)) + " |")
    at_best = [r for r in results if math.isclose(r["learning_rate"], best[r["model"]])]
    table, _ = results_table(at_best, settings)
    verdicts = []
    for m in models:
        if m == "llama":
            continue
        own = f"each at its own best rate ({LABELS[m]} {best[m]:g}, Llama {best['llama']:g})"
        for label, runs in ((own, at_best),
                            *[(f"both at {rate:g}", [r for r in results if math.isclose(r["learning_rate"], rate)])
                              for rate in rates]):
            verdict, ours, base = compare(runs, lambda r: r["ppl"], m, "lower")
            verdicts.append(f"- {LABELS[m]} vs Llama, {label}: perplexity {ours:.2f} vs {base:.2f} — **{verdict}** "
                            f"(gap {ours - base:+.2f}).")
    reused = sorted({r["reused_from"] for r in results if r.get("reused_from")})
    n_reused = sum(1 for r in results if r.get("reused_from"))
    loads = state.get("load_samples") or []
    fig, axis = plt.subplots(figsize=(6, 4))
    for m in models:
        stats = [ppl(m, rate) for rate in rates]
        axis.errorbar(rates, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                      label=LABELS[m])
    axis.set_xscale("log")
    axis.set_xlabel("peak learning rate")
    axis.set_ylabel("held-out perplexity (lower is better)")
    axis.set_title("Text study: learning-rate sweep (mean ± std over seeds)")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    fig.savefig(out / "paper_effects_lr_sweep.png", dpi=120)
    plt.close(fig)
    text = [
        "# Text study: does V1's perplexity gap survive a learning-rate sweep?",
        "",
        f"Produced by `{state['command']}`; per-run values in "
        "[`paper_effects_lr_sweep.json`](paper_effects_lr_sweep.json). Settings are the default text study's "
        "(`paper_effects.md`), apart from the peak learning rate.",
        "",
        f"- **Machine:** {machine_description()}.",
        "- **Load:** " + (f"1-minute load average during the run: mean {statistics.fmean(loads):.1f}, max "
                          f"{max(loads):.1f}, on {os.cpu_count()} cores." if loads else "not recorded."),
        f"- **Wall time:** {state['wall_seconds'] / 60:.1f} min for the {len(results) - n_reused} runs trained here "
        f"({settings.workers} worker(s) × {settings.threads_per_worker} thread(s))"
        + (f"; {n_reused} runs at the same settings were taken from {', '.join(reused)} (the default study, "
           "same code path, same sequences) instead of retrained." if n_reused else "."),
        "",
        "## Held-out perplexity (mean ± std over seeds "
        f"{', '.join(map(str, settings.seeds))}; bold = each model's best rate)",
        "",
        *lines,
        "",
        "![learning-rate sweep](paper_effects_lr_sweep.png)",
        "",
        "## The V1 question (\"better\"/\"worse\" only when the means differ by more than the sum of the two stds)",
        "",
        *verdicts,
        "",
        "## Every metric, each model at its own best rate",
        "",
        table,
        "",
    ]
    path = out / "paper_effects_lr_sweep.md"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def run_jobs(job_fn, jobs: list[dict], workers: int, total_steps: int, partial: Path, state: dict) -> list[dict]:
    """Run `job_fn(job, queue)` for every job, in `workers` spawned processes (in this one when workers ≤ 1).

    Shows one progress bar over `total_steps` training steps of all jobs (jobs report through the queue, see
    `_drain_one`), samples the load into `state["load_samples"]`, and after every finished job writes `state` with
    the finished results to `partial` (for ``--report-only`` after an interruption). Returns results in job order.
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, desc="training steps (all runs)", unit="step", dynamic_ncols=True)
    results = []
    if workers <= 1:
        import queue as queue_module

        progress = queue_module.SimpleQueue()
        for job in jobs:
            results.append(job_fn(job, progress))
            _sample_load(state)
            while not progress.empty():
                _drain_one(progress.get(), bar)
            _write_partial(partial, results, state)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, wait

        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            progress = manager.Queue()
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = [pool.submit(job_fn, job, progress) for job in jobs]
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, timeout=1.0)
                    _sample_load(state)
                    while not progress.empty():
                        _drain_one(progress.get(), bar)
                    if done:
                        _write_partial(partial, [f.result() for f in futures if f.done()], state)
                results = [f.result() for f in futures]
    bar.close()
    return results


def _sample_load(state: dict):
    """Record the 1-minute load average (at most every 30 s): the report says how busy the shared machine was."""
    if hasattr(os, "getloadavg") and time.time() - state.get("_last_load", 0) >= 30:
        state["_last_load"] = time.time()
        state["load_samples"].append(round(os.getloadavg()[0], 2))


def _write_partial(partial: Path, results: list[dict], state: dict):
    """Keep the finished runs on disk while the study goes on (`partial`), for --report-only."""
    state = {k: v for k, v in state.items() if not k.startswith("_")}
    state.update(results=results, elapsed_seconds=time.time() - state["started"])
    partial.write_text(json.dumps(state, indent=1))


def report_from_partial(out: Path, note: str = ""):
    """Re-write the report from saved measurements, without training: from OUT/paper_effects.partial.json (an
    interrupted study) or else from OUT/paper_effects.json (a finished one)."""
    partial = out / "paper_effects.partial.json"
    state = json.loads((partial if partial.exists() else out / "paper_effects.json").read_text())
    settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["settings"].items()})
    preset = state.get("preset") or next((name for name, p in PRESETS.items() if asdict(p) == asdict(settings)),
                                         "custom")
    command = state.get("command") or "python benchmarks/paper_effects.py"
    results = state["results"]
    finished = {(r["model"], r["seed"]) for r in results}
    missing = [f"{m} seed {s}" for s in settings.seeds for m in MODELS if (m, s) not in finished]
    wall = state.get("elapsed_seconds", state.get("wall_seconds"))
    write_report(results, settings, state["parameters"], wall, out, "paper_effects", preset, command, missing,
                 rendered_from=(partial if partial.exists() else out / "paper_effects.json").name,
                 load_samples=state.get("load_samples"), note=note or state.get("note", ""))
    print(f"wrote {out / 'paper_effects.md'} from {len(results)} finished runs; missing: {', '.join(missing) or '-'}")


def _drain_one(message, bar):
    """Show one job's message on the shared bar: a finished step, its loss or accuracy, a phase, the job's end."""
    tag, kind, value = message
    if kind == "step":
        bar.update(value)
    elif kind == "loss":
        bar.set_postfix_str(f"{tag}: loss {value:.3f}")
    elif kind == "acc":
        bar.set_postfix_str(f"{tag}: accuracy {value:.0%}")
    elif kind == "phase":
        bar.set_postfix_str(f"{tag}: evaluating")
    elif kind == "done":
        bar.write(f"finished {tag}")


if __name__ == "__main__":
    main()
