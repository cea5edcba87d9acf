"""Associative recall among distractors: does differential attention retrieve better? A learning-rate-fair study.

Trains Llama, DiffTransformer V1 and DiffTransformer V2 from scratch with the 🤗 Trainer on multi-query associative
recall (MQAR, as in Zoology, Arora et al. 2023) with the paper's condition added: irrelevant context. Each sequence
holds `pairs` key–value pairs, most of them distractors that are never queried, with filler tokens scattered between
the pairs up to a context length; then `queries` of the keys follow, each with its value, and the model is trained
and scored on predicting those values. By default each context pair is ONE token standing for (key, value):

    <s>  f f [k₁v₁] f [k₂v₂] f f f [k₃v₃] …  (context: pairs + filler)   k₂ v₂ k₃ v₃ …  (queries: loss on the values)

so retrieval is one attention hop: match the query key against the pair tokens, copy the value. With
``--two-token-pairs`` a pair is written ``k v`` (Zoology's format), which also needs an induction circuit across two
layers; no model learned that within this CPU budget (``results/recall_study/calibration.md``), so it is not the
default.
Keys, values, fillers and pair tokens are disjoint token ranges. Everything is drawn from a seed; evaluation
sequences are drawn like training ones, from other streams of the seed. Training mixes every cell of the difficulty
grid (number of pairs × context length); evaluation scores each cell on its own.

For each model width, model, learning rate and seed it records:

- recall accuracy per cell at the end (share of queries whose value is the argmax prediction),
- the accuracy curve per cell during training and the steps to reach 90%,
- where the last layer looks from each query key: the attention on the queried pair (its token(s)),
  on the distractor pairs and on the filler, each as a share of the row's total absolute attention (a differential
  row need not sum to 1 and can be negative: Diff models report their differential map),
- the parameter count (the three models are within 2% at each width; V1 with the paper's heads, V2 with DIFF V2's).

It reports each model at its own best learning rate (by mean final accuracy over cells and seeds), mean ± std over
seeds, and calls a difference only when the means differ by more than the sum of the two standard deviations.
Writes ``recall_study.md``, ``recall_study.json`` (every run, every curve) and PNG charts into ``--out`` (default
``benchmarks/results/recall_study``). Settings: ``config.py`` beside this file; the task: ``task.py``; the flags every
study shares and its jobs: ``benchmarks/harness/study.py``.

    python -m benchmarks.studies.recall.recall_study             # the default study: 27 runs, 44 min on 2 idle cores
    python -m benchmarks.studies.recall.recall_study --layers    # re-train the best-rate runs, every layer's attention
    python -m benchmarks.studies.recall.recall_study --smoke     # seconds, for the tests

Jobs run in ``--workers`` processes of one thread each.
"""

import json
import math
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from benchmarks.harness import study
from benchmarks.harness.models import init_model, parameter_count
from benchmarks.harness.report import best_rate as best_mean_rate
from benchmarks.harness.report import (
    mean_pm_std,
    mean_std,
    study_header,
    sweep_table,
    verdict,
    write_study,
    write_text,
)
from benchmarks.harness.study import LABELS, MODELS, Study, settings_from_dict
from benchmarks.harness.training import reporter, study_trainer
from benchmarks.studies.recall.config import PRESETS, Settings, model_config
from benchmarks.studies.recall.task import (
    attention_shares,
    cell_name,
    eval_data,
    recall_accuracy,
    steps_to,
    training_data,
)


def run_job(job: dict, queue=None) -> dict:
    """Train `job["model"]` at `job["width"]`, `job["learning_rate"]`, `job["seed"]`; measure; return a dict."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    settings = Settings(**job["settings"])
    torch.set_num_threads(settings.threads_per_worker)
    name, width, rate, seed = job["model"], job["width"], job["learning_rate"], job["seed"]
    report = reporter(queue, f"{name} w{width} lr {rate:g} seed {seed}")

    model = init_model(model_config(settings, width, name), seed)
    data = training_data(settings, seed)
    curve_set = eval_data(settings, seed, settings.curve_samples, purpose=1)
    curve = []

    def check(step):
        model.eval()
        curve.append({"step": step, "acc": {cell_name(c): recall_accuracy(model, b) for c, b in curve_set.items()}})
        model.train()

    class Curve(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            report("step", 1)
            if state.global_step % settings.eval_every == 0 or state.global_step == settings.steps:
                check(state.global_step)
                report("acc", curve[-1]["acc"][cell_name(settings.cells[0])])

    started = time.time()
    check(0)
    trainer = study_trainer(model, data, settings, rate, seed, job["scratch"], [Curve()],
                                    quiet=queue is not None, sequential=True)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    train_seconds = time.time() - started

    report("phase", "eval")
    model.eval()
    final = eval_data(settings, seed, settings.eval_samples, purpose=2)
    attention = eval_data(settings, seed, settings.attention_samples, purpose=3)
    cells = [cell_name(c) for c in settings.cells]
    result = {
        "model": name, "width": width, "seed": seed, "learning_rate": rate,
        "parameters": parameter_count(model),
        "acc": {cell_name(c): recall_accuracy(model, b) for c, b in final.items()},
        "curve": curve,
        "steps_to_90": {cell: steps_to(curve, cell) for cell in cells},
        "attention": {cell_name(c): attention_shares(model, b) for c, b in attention.items()},
        "train_loss_curve": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "train_seconds": train_seconds,
        "train_tokens": settings.steps * settings.batch_size * settings.seq_len,
    }
    result["mean_acc"] = statistics.fmean(result["acc"].values())
    report("done")
    return result


def arguments(parser):
    """The recall study's own flags."""
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help="model widths (hidden sizes) to train; default: the preset's")
    parser.add_argument("--two-token-pairs", action="store_true",
                        help="write each context pair as two tokens, key then value (Zoology's MQAR format), instead "
                             "of one key–value token; solving it needs an induction circuit across two layers, which "
                             "no model formed within the CPU budget here (see the report's note)")
    parser.add_argument("--layers", action="store_true",
                        help="after a study: re-train each model at its best rate (read from OUT/recall_study.json), "
                             "every seed, measure the attention shares of every layer, check that the accuracies "
                             "are reproduced, write OUT/recall_study_layers.json and re-render the report")


def run(ctx) -> list[dict]:
    """Every model, width, learning rate and seed (runs of --reuse files at the same settings taken), then the
    report; with --layers, the best-rate runs again with every layer's attention."""
    if ctx.args.layers:
        return layers_study(ctx)
    settings = ctx.settings
    if ctx.args.widths:
        settings = replace(settings, widths=tuple(ctx.args.widths))
    if ctx.args.two_token_pairs:
        settings = replace(settings, fused_pairs=False)
    ctx.use_settings(settings)
    params = {f"{m}@{w}": parameter_count(init_model(model_config(settings, w, m), 0))
              for w in settings.widths for m in MODELS}
    for w in settings.widths:
        counts = [params[f"{m}@{w}"] for m in MODELS]
        assert max(counts) / min(counts) - 1 <= 0.02, f"parameters differ by more than 2% at width {w}: {counts}"
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()))
    ctx.state["parameters"] = params
    keys = job_keys(settings)
    reused = [r for r in ctx.reusable() if run_key(r) in keys]
    done = {run_key(r) for r in reused}
    jobs = [{"model": m, "width": w, "learning_rate": lr, "seed": s, "settings": asdict(settings),
             "scratch": str(ctx.scratch / f"{m}-{w}-{lr:g}-{s}")}
            for (m, w, lr, s) in keys if (m, w, lr, s) not in done]
    results = reused + ctx.train(run_job, jobs, finished=reused)
    return ctx.finish(results)["results"]


def layers_study(ctx) -> list[dict]:
    """`--layers`: re-train every model at its best rate (each seed) and measure every layer's attention shares."""
    state = json.loads((ctx.out / "recall_study.json").read_text())
    settings = settings_from_dict(Settings, state["settings"])
    ctx.use_settings(settings)
    results = state["results"]
    jobs = [{"model": m, "width": w, "learning_rate": best_rate(results, m, w), "seed": s,
             "settings": asdict(settings), "scratch": str(ctx.scratch / f"{m}-{w}-{s}")}
            for w in sorted({r["width"] for r in results}) for m in MODELS for s in settings.seeds]
    reruns = ctx.train(run_job, jobs, "recall_study_layers")
    for run in reruns:
        original = runs_of(results, run["model"], run["width"], run["learning_rate"])
        original = next(r for r in original if r["seed"] == run["seed"])
        run["acc_difference_to_study"] = max(abs(run["acc"][c] - original["acc"][c]) for c in run["acc"])
        del run["curve"], run["train_loss_curve"]
    layers = ctx.saved_state([])
    layers = dict({k: v for k, v in layers.items() if k != "results"}, runs=reruns)
    write_text(ctx.out / "recall_study_layers.json", json.dumps(layers, indent=1) + "\n")
    ctx.cleanup("recall_study_layers")
    render(state, ctx.out)
    print(f"wrote {ctx.out / 'recall_study_layers.json'} and re-rendered {ctx.out / 'recall_study.md'} in "
          f"{layers['wall_seconds'] / 60:.1f} min")
    return reruns


def run_key(run: dict) -> tuple:
    """(model, width, learning rate, seed): what a run stands for."""
    return run["model"], run["width"], run["learning_rate"], run["seed"]


def job_keys(settings: Settings) -> list[tuple]:
    """(model, width, learning rate, seed) of every run, larger widths and slower models first (better packing)."""
    return [(m, w, lr, s) for w in sorted(settings.widths, reverse=True) for s in settings.seeds
            for lr in settings.learning_rates for m in ("diff-v2", "diff-v1", "llama")]


def runs_of(results: list[dict], model: str, width: int, rate: float | None = None) -> list[dict]:
    return [r for r in results if r["model"] == model and r["width"] == width
            and (rate is None or math.isclose(r["learning_rate"], rate))]


def best_rate(results: list[dict], model: str, width: int) -> float | None:
    """The learning rate with the highest mean (over seeds) of the accuracy averaged over every cell."""
    return best_mean_rate(runs_of(results, model, width), lambda r: r["mean_acc"], lower=False)


def at_best(results: list[dict], width: int) -> dict:
    """{model: runs (one per seed) at that model's best learning rate} for one width."""
    return {m: runs_of(results, m, width, best_rate(results, m, width)) for m in MODELS
            if runs_of(results, m, width)}


def fmt(stats: tuple[float, float]) -> str:
    return mean_pm_std(stats, percent=True)


def steps_cell(runs: list[dict], cell: str, steps: int) -> str:
    """Steps to 90% as "mean ± std (k/n seeds)" over the seeds that got there, or "never (0/n)"."""
    reached = [r["steps_to_90"][cell] for r in runs if r["steps_to_90"][cell] is not None]
    if not reached:
        return f"not within {steps} (0/{len(runs)})"
    mean, std = mean_std(reached)
    return f"{mean:.0f} ± {std:.0f} ({len(reached)}/{len(runs)})"


# ----------------------------------------------------------------------------------------------------------------
# report and charts


def headline_table(results: list[dict], settings: Settings, width: int) -> list[str]:
    """One row per model at its best learning rate: the numbers the README quotes."""
    best = at_best(results, width)
    easy, hard = cell_name(settings.cells[0]), cell_name(settings.cells[-1])
    lines = [f"| model (width {width}) | parameters | best learning rate | accuracy, mean over cells | "
             f"accuracy {easy} (easiest) | accuracy {hard} (hardest) | steps to 90%, {easy} | "
             f"attention on queried pair, {hard} | on distractor pairs | on filler |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, runs in best.items():
        share = lambda key, runs=runs: fmt(mean_std([r["attention"][hard]["mean"][key] for r in runs]))  # noqa: E731
        accuracy = [fmt(mean_std([r["acc"][cell] for r in runs])) for cell in (easy, hard)]
        lines.append(f"| {LABELS[m]} | {runs[0]['parameters']:,} | {runs[0]['learning_rate']:g} | "
                     f"{fmt(mean_std([r['mean_acc'] for r in runs]))} | {accuracy[0]} | {accuracy[1]} | "
                     f"{steps_cell(runs, easy, settings.steps)} | {share('queried_pair')} | "
                     f"{share('distractor_pairs')} | {share('filler')} |")
    return lines


def cell_tables(results: list[dict], settings: Settings, width: int) -> list[str]:
    """Accuracy, steps to 90% and attention shares per cell, each model at its best learning rate."""
    best = at_best(results, width)
    head = "| cell (pairs / context) | " + " | ".join(LABELS[m] for m in best) + " |"
    rule = "| --- |" + " --- |" * len(best)
    acc, steps, attention = [head, rule], [head, rule], [head, rule]
    for cell in map(cell_name, settings.cells):
        acc.append(f"| {cell} | " + " | ".join(fmt(mean_std([r["acc"][cell] for r in runs]))
                                               for runs in best.values()) + " |")
        steps.append(f"| {cell} | " + " | ".join(steps_cell(runs, cell, settings.steps) for runs in best.values())
                     + " |")
        cells = []
        for runs in best.values():
            parts = [mean_std([r["attention"][cell][kind]["queried_pair"] for r in runs])[0]
                     for kind in ("mean", "best_head")]
            noise = mean_std([r["attention"][cell]["mean"]["distractor_pairs"] for r in runs])[0]
            cells.append(f"{parts[0]:.1%} / {noise:.1%} (best head {parts[1]:.1%})")
        attention.append(f"| {cell} | " + " | ".join(cells) + " |")
    return ["Recall accuracy (mean ± std over seeds):", "", *acc, "",
            "Steps to reach 90% accuracy (mean ± std over the seeds that reached it, checked every "
            f"{settings.eval_every} steps on {settings.curve_samples} sequences per cell):", "", *steps, "",
            "Last-layer attention from the query key: share on the queried pair / on all distractor pairs, averaged "
            "over heads (and on the queried pair for the head that puts most there):", "", *attention]


def sweep_lines(results: list[dict], settings: Settings, width: int) -> list[str]:
    """Mean accuracy over cells for every model and learning rate: the whole sweep, best marked."""
    rates = sorted({r["learning_rate"] for r in results if r["width"] == width})
    return sweep_table("model", rates, [
        (LABELS[m], best_rate(results, m, width),
         {rate: fmt(mean_std([r["mean_acc"] for r in runs_of(results, m, width, rate)])) for rate in rates})
        for m in MODELS if best_rate(results, m, width) is not None])

def findings(results: list[dict], settings: Settings, width: int) -> list[str]:
    """The paper's claims, one bullet each, with the verdict computed from the runs at each model's best rate."""
    best = at_best(results, width)
    if "llama" not in best:
        return ["- No Llama runs: nothing to compare against."]
    hard = cell_name(settings.cells[-1])
    easy = cell_name(settings.cells[0])
    many = [cell_name(c) for c in settings.cells if c[0] == max(settings.pairs)]
    claims = [
        ("higher recall accuracy (mean over every cell)", lambda r: r["mean_acc"], True),
        (f"higher recall accuracy with the most distractors ({', '.join(many)}, mean)",
         lambda r: statistics.fmean(r["acc"][c] for c in many), True),
        (f"more attention on the queried pair among distractors ({hard}, last layer, share of |attention|)",
         lambda r: r["attention"][hard]["mean"]["queried_pair"], True),
        (f"less attention on the distractor pairs ({hard})",
         lambda r: r["attention"][hard]["mean"]["distractor_pairs"], False),
        (f"less attention on the filler ({hard})", lambda r: r["attention"][hard]["mean"]["filler"], False),
    ]
    lines = []
    base = best["llama"]
    for claim, get, higher in claims:
        parts = []
        for m in ("diff-v1", "diff-v2"):
            if m in best:
                ours = [get(r) for r in best[m]]
                parts.append(f"{LABELS[m]}: **{verdict(ours, [get(r) for r in base], higher)}** "
                             f"({statistics.fmean(ours):.1%} vs {statistics.fmean(get(r) for r in base):.1%})")
        lines.append(f"- Paper: {claim}. Here, against Llama at each model's best rate — " + "; ".join(parts) + ".")
    reached = {m: [r["steps_to_90"][easy] for r in runs] for m, runs in best.items()}
    speed = "; ".join(f"{LABELS[m]} {sum(s is not None for s in v)}/{len(v)} seeds"
                      + (f", mean {statistics.fmean(s for s in v if s is not None):.0f} steps"
                         if any(s is not None for s in v) else "") for m, v in reached.items())
    lines.append(f"- Learning speed: seeds reaching 90% in the easiest cell ({easy}) — {speed}.")
    every = {m: [r for r in results if r["model"] == m and r["width"] == width] for m in best}
    robust = "; ".join(f"{LABELS[m]} {sum(r['steps_to_90'][easy] is not None for r in runs)}/{len(runs)}"
                       for m, runs in every.items())
    lines.append(f"- Robustness to the learning rate: runs, over every rate and seed, that reached 90% in {easy} — "
                 f"{robust}.")
    live = max((statistics.fmean(r["acc"][easy] for r in runs) for runs in best.values()), default=0.0)
    lines.append(f"- The instrument is {'live' if live >= 0.9 else '**not live**'}: the best model reaches "
                 f"{live:.1%} in the easiest cell (the study asks for ≥ 90%).")
    return lines


def make_chart(results: list[dict], settings: Settings, width: int, out: Path, name: str) -> dict:
    """One PNG, four panels: accuracy per cell, the learning-rate sweep, the easiest and hardest cells' curves.

    Returns the plotted means and stds per panel (kept in the JSON beside the runs).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"llama": "tab:gray", "diff-v1": "tab:blue", "diff-v2": "tab:orange"}
    best = at_best(results, width)
    cells = [cell_name(c) for c in settings.cells]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    plotted = {"cells": cells, "accuracy": {}, "learning_rates": [], "sweep": {}, "curves": {}}
    bar = 0.8 / max(1, len(best))
    for i, (m, runs) in enumerate(best.items()):
        stats = plotted["accuracy"][m] = [mean_std([r["acc"][c] for r in runs]) for c in cells]
        axes[0, 0].bar([j + (i - (len(best) - 1) / 2) * bar for j in range(len(cells))], [s[0] for s in stats], bar,
                       yerr=[s[1] for s in stats], capsize=2, color=colors[m],
                       label=f"{LABELS[m]} (lr {runs[0]['learning_rate']:g})")
    axes[0, 0].set_xticks(range(len(cells)), cells, rotation=30, fontsize=8)
    axes[0, 0].set_ylabel("recall accuracy")
    axes[0, 0].set_title("Accuracy per cell, each model at its best rate")
    axes[0, 0].legend(fontsize=8)
    rates = plotted["learning_rates"] = sorted({r["learning_rate"] for r in results if r["width"] == width})
    for m in best:
        stats = plotted["sweep"][m] = [mean_std([r["mean_acc"] for r in runs_of(results, m, width, rate)])
                                       for rate in rates]
        axes[0, 1].errorbar(rates, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                            color=colors[m], label=LABELS[m])
    axes[0, 1].set_xscale("log")
    axes[0, 1].set_xlabel("peak learning rate")
    axes[0, 1].set_ylabel("accuracy, mean over cells")
    axes[0, 1].set_title("Learning-rate sweep (mean ± std over seeds)")
    axes[0, 1].legend(fontsize=8)
    for axis, cell in ((axes[1, 0], cells[0]), (axes[1, 1], cells[-1])):
        for m, runs in best.items():
            steps = [p["step"] for p in runs[0]["curve"]]
            stats = [mean_std([r["curve"][k]["acc"][cell] for r in runs]) for k in range(len(steps))]
            plotted["curves"][f"{m}/{cell}"] = {"steps": steps, "stats": stats}
            means = np.array([s[0] for s in stats])
            stds = np.array([s[1] for s in stats])
            axis.plot(steps, means, color=colors[m], label=LABELS[m])
            axis.fill_between(steps, means - stds, means + stds, color=colors[m], alpha=0.2)
        axis.axhline(0.9, color="k", ls=":", lw=1)
        axis.set_xlabel("training step")
        axis.set_ylabel("recall accuracy")
        axis.set_title(f"Training curve, {cell}")
        axis.legend(fontsize=8)
    for axis in axes.flat:
        axis.grid(alpha=0.3)
    fig.suptitle(f"Associative recall among distractors (width {width})")
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return plotted


READING = """
- **What is tested.** The paper's retrieval claim: with many distractor pairs and irrelevant filler in the context,
  does subtracting two softmax maps let attention find the queried key more reliably? With one-token pairs the task
  is exactly that, one attention hop (match the query key, copy the value); it does not test the induction circuits
  that two-token formats and natural text also need.
- **Learning rate and seeds.** Small models learn this task through a plateau followed by a jump, and when the jump
  comes varies with the rate and the seed. A comparison at one shared rate can therefore favour whichever model
  that rate suits; here every model is reported at its own best rate, every rate's numbers are in the sweep table,
  and a difference counts only when it exceeds the seed spread.
- **Attention shares.** A softmax row sums to 1; a differential row sums to 1 − λ and can hold negative entries. The
  shares divide by the row's total |attention|, so 100% on the queried pair means all of the row's attention mass
  is there, for either kind of map. The last layer is measured (of 2); a model may also retrieve partly in the
  first layer, which these shares do not see.
- **Scale.** ~0.1M-parameter models, a few minutes of CPU training each: an answer for this scale and this task,
  not for the paper's 3B models.
"""


def render(state: dict, out: Path) -> dict:
    """recall_study.md, recall_study.json and one chart per width from `state` (settings, runs, timing); a partial
    state names the runs that did not finish."""
    settings = settings_from_dict(Settings, state["settings"])
    results = state["results"]
    done = {run_key(r) for r in results}
    missing = [f"{m} w{w} lr {lr:g} seed {s}" for (m, w, lr, s) in job_keys(settings) if (m, w, lr, s) not in done]
    wall = state.get("wall_seconds", state.get("elapsed_seconds", float("nan")))
    layers_file = out / "recall_study_layers.json"
    layers = json.loads(layers_file.read_text()) if layers_file.exists() else None
    lines = [
        *study_header(
            "Associative recall among distractors: Llama vs DiffTransformer V1 and V2", state,
            f" (preset **{state['preset']}**); every run, curve and measurement is in "
            "[`recall_study.json`](recall_study.json).",
            f"**Wall time:** {wall / 60:.1f} min for {len(results)} training runs in {settings.workers} worker "
            f"process(es) × {settings.threads_per_worker} thread(s).",
            f"**INCOMPLETE:** missing runs: {', '.join(missing)}." if missing else None,
            f"**Note:** {state['note']}" if state.get("note") else None),
        "",
    ]
    charts = {}
    for width in sorted({r["width"] for r in results}):
        chart = f"recall_study_width{width}.png"
        charts[chart] = make_chart(results, settings, width, out, chart)
        lines += [f"## Width {width}", "", "Each model at its own best learning rate (mean ± std over seeds "
                  f"{', '.join(map(str, settings.seeds))}):", "", *headline_table(results, settings, width), "",
                  "### Findings", "", "\"Better\"/\"worse\" only when the means differ by more than the sum of the "
                  "two standard deviations over seeds.", "", *findings(results, settings, width),
                  *(retrieval_layer_findings(layers, settings, width) if layers else []), "",
                  f"![recall study, width {width}]({chart})", "",
                  "### Learning-rate sweep (accuracy, mean over cells; bold = the rate each model is reported at)",
                  "", *sweep_lines(results, settings, width), "",
                  "### Per cell, each model at its best rate", "", *cell_tables(results, settings, width), ""]
        if layers:
            lines += ["### Every layer's attention (re-trained best-rate runs, `--layers`)", "",
                      *layer_table(layers, settings, width), ""]
    params = {(r["model"], r["width"]): r["parameters"] for r in results}
    lines += [
        "## How to read this",
        "",
        READING.strip(),
        "",
        "## Settings",
        "",
        f"- Task: MQAR with distractors. Vocabulary {settings.vocab_size}: {settings.num_keys} key tokens, "
        f"{settings.num_values} value tokens, {settings.num_fillers} filler tokens"
        + (f", {settings.num_keys * settings.num_values} pair tokens (one per key–value combination; a context pair "
           "is one token)" if settings.fused_pairs else " (a context pair is two tokens, key then value)")
        + ", PAD, BOS. Each sequence: BOS, a "
        f"context of `pairs` key–value pairs (distinct keys, values drawn with replacement) with filler tokens "
        f"scattered uniformly into the gaps up to the context length, then {settings.queries} queried keys (distinct, "
        f"from the pairs; the other pairs are distractors), each followed by its value. Loss and accuracy only on "
        f"the queried values; chance is 1/{settings.num_values}.",
        f"- Grid: pairs {list(settings.pairs)} × context {list(settings.context_lens)} tokens (cells with more pair "
        f"tokens than context dropped): {', '.join(map(cell_name, settings.cells))}. Training draws every "
        f"sequence's cell uniformly from the grid; sequences are right-padded to {settings.seq_len} tokens.",
        f"- Data from numpy's PCG64 seeded with [seed, stream]: stream 0 = training ({settings.steps} × "
        f"{settings.batch_size} sequences, in order, the same for every model and rate of a seed), 1 = the curve "
        f"set ({settings.curve_samples} per cell), 2 = the final accuracy set ({settings.eval_samples} per cell, "
        f"{settings.eval_samples * settings.queries} queries at most), 3 = the attention set "
        f"({settings.attention_samples} per cell).",
        f"- Models: {settings.num_hidden_layers} layers, tied embeddings, RoPE; Llama {settings.heads} heads (= KV "
        f"heads), SwiGLU 8/3·width; V1 the same numbers (the paper's layout: {settings.heads // 2} differential heads "
        f"with values twice as wide); V2 DIFF V2's layout ({2 * settings.heads} query heads, {settings.heads} KV "
        "heads) with a narrower SwiGLU so its parameters match (`harness.models.equal_parameter_configs`). "
        "Parameters: "
        + ", ".join(f"{LABELS[m]} {p:,} (width {w})" for (m, w), p in sorted(params.items(), key=lambda x: x[0][1]))
        + ".",
        f"- Training (🤗 Trainer, the same recipe for all): {settings.steps} steps × batch {settings.batch_size}, "
        f"AdamW β = {tuple(settings.adam_betas)}, weight decay {settings.weight_decay}, gradient clipping 1.0, "
        f"linear warmup over {settings.warmup_fraction:.0%} of the steps then linear decay to "
        f"{settings.min_lr_ratio:.0%} of the peak, fp32, sdpa attention; peak learning rates "
        f"{', '.join(f'{r:g}' for r in settings.learning_rates)}, seeds {', '.join(map(str, settings.seeds))}. A "
        "model's best rate is the one with the highest mean accuracy over cells and seeds.",
        "- Attention shares: eager attention, last layer, at every query-key position (the position that predicts "
        "the value); the attention summed over the queried pair's token(s), over every distractor pair's tokens "
        "and over the filler, each divided by the row's total |attention| (1 for softmax; a differential row sums "
        "to 1 − λ and may hold negative entries, so shares can be negative and are on one scale for all models).",
        "",
    ]
    saved = {k: v for k, v in state.items() if k != "charts"}
    return write_study(out, "recall_study", "\n".join(lines) + "\n", dict(saved, charts=charts))


def layer_table(layers: dict, settings: Settings, width: int) -> list[str]:
    """Attention shares of every layer at the hardest cell, from the `--layers` re-runs (mean over seeds)."""
    runs = [r for r in layers["runs"] if r["width"] == width]
    hard = cell_name(settings.cells[-1])
    count = len(runs[0]["attention"][hard]["layers"]) if runs else 0
    lines = ["| model (lr) | layer | queried pair | distractor pairs | filler | queried pair, best head |",
             "| --- | --- | --- | --- | --- | --- |"]
    for m in MODELS:
        mine = [r for r in runs if r["model"] == m]
        for layer in range(count):
            shares = [r["attention"][hard]["layers"][layer] for r in mine]
            cells = [fmt(mean_std([x["mean"][k] for x in shares])) for k in ("queried_pair", "distractor_pairs",
                                                                           "filler")]
            best = fmt(mean_std([x["best_head"]["queried_pair"] for x in shares]))
            lines.append(f"| {LABELS[m]} ({mine[0]['learning_rate']:g}) | {layer + 1} of {count} | "
                         + " | ".join(cells) + f" | {best} |")
    reproduced = max(r["acc_difference_to_study"] for r in runs)
    return [f"From `{layers['command']}` ({layers['wall_seconds'] / 60:.1f} min): every model re-trained at its best "
            f"rate, each seed, with the same data and initialisation; the largest difference between a re-trained "
            f"run's accuracy in any cell and the study's is {reproduced:.1%}. Shares at {hard}, mean ± std over "
            "seeds:", "", *lines]


def retrieval_layer_findings(layers: dict, settings: Settings, width: int) -> list[str]:
    """The attention claims again, in each model's retrieval layer: the one with the most attention on the queried
    pair (mean over seeds), from the `--layers` re-runs."""
    runs = [r for r in layers["runs"] if r["width"] == width]
    hard = cell_name(settings.cells[-1])

    def retrieval_layer(model):
        mine = [r for r in runs if r["model"] == model]
        count = len(mine[0]["attention"][hard]["layers"])
        means = [statistics.fmean(r["attention"][hard]["layers"][i]["mean"]["queried_pair"] for r in mine)
                 for i in range(count)]
        layer = max(range(count), key=means.__getitem__)
        return layer, [r["attention"][hard]["layers"][layer]["mean"] for r in mine]

    peaks = {m: retrieval_layer(m) for m in MODELS}
    lines = []
    for key, claim, higher in (("queried_pair", "more attention on the queried pair", True),
                               ("distractor_pairs", "less attention on the distractor pairs", False),
                               ("filler", "less attention on the filler", False)):
        base = [x[key] for x in peaks["llama"][1]]
        parts = []
        for m in ("diff-v1", "diff-v2"):
            layer, shares = peaks[m]
            ours = [x[key] for x in shares]
            parts.append(f"{LABELS[m]} (layer {layer + 1}): **{verdict(ours, base, higher)}** "
                         f"({statistics.fmean(ours):.1%} vs {statistics.fmean(base):.1%})")
        lines.append(f"- Paper: {claim} ({hard}), here in each model's retrieval layer (the one with the most "
                     f"attention on the queried pair; Llama: layer {peaks['llama'][0] + 1}) — " + "; ".join(parts)
                     + ".")
    return lines


STUDY = Study(name="recall_study", module="benchmarks.studies.recall.recall_study", doc=__doc__, presets=PRESETS,
              run=run, reports={"recall_study": render}, arguments=arguments,
              preset_help={"smoke": "tiny models, a few steps, one seed: checks the pipeline and the files in seconds "
                                    "(CI)"},
              free=("learning_rates", "seeds", "workers", "widths"))


def main(argv=None):
    return study.main(STUDY, argv)


if __name__ == "__main__":
    main()
