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
``benchmarks/results/recall_study``). Settings: ``config.py`` beside this file; the task: ``task.py``.

    python -m benchmarks.studies.recall.recall_study             # the default study: 27 runs, 44 min on 2 idle cores
    python -m benchmarks.studies.recall.recall_study --layers    # re-train the best-rate runs, every layer's attention
    python -m benchmarks.studies.recall.recall_study --smoke     # seconds, for the tests

Jobs run in ``--workers`` processes of one thread each.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.harness.models import parameter_count
from benchmarks.harness.report import add_run_arguments, command
from benchmarks.studies import harness
from benchmarks.studies.recall.config import PRESETS, Settings, model_config
from benchmarks.studies.recall.report import best_rate, runs_of, write_report
from benchmarks.studies.recall.task import (
    attention_shares,
    cell_name,
    eval_data,
    recall_accuracy,
    steps_to,
    training_data,
)

MODULE = "benchmarks.studies.recall.recall_study"


def run_job(job: dict, queue=None) -> dict:
    """Train `job["model"]` at `job["width"]`, `job["learning_rate"]`, `job["seed"]`; measure; return a dict."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    settings = Settings(**job["settings"])
    torch.set_num_threads(settings.threads_per_worker)
    name, width, rate, seed = job["model"], job["width"], job["learning_rate"], job["seed"]
    report = harness.reporter(queue, f"{name} w{width} lr {rate:g} seed {seed}")

    model = harness.init_model(model_config(settings, width, name), seed)
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
    trainer = harness.study_trainer(model, data, settings, rate, seed, job["scratch"], [Curve()],
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny models, a few steps, one seed: checks the pipeline and the files in seconds (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0..n-1); default: the preset's")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run; default: the preset's")
    parser.add_argument("--workers", type=int, default=None,
                        help="training processes in parallel, one thread each; default: the preset's")
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
    parser.add_argument("--report-only", action="store_true",
                        help="do not train: write the report from OUT/recall_study.partial.json (an interrupted "
                             "study) or OUT/recall_study.json (a finished one)")
    parser.add_argument("--note", default="", help="one line of context added to the report")
    add_run_arguments(parser, "recall_study")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        partial = out / "recall_study.partial.json"
        state = json.loads((partial if partial.exists() else out / "recall_study.json").read_text())
        settings = harness.settings_from_dict(Settings, state["settings"])
        done = {(r["model"], r["width"], r["learning_rate"], r["seed"]) for r in state["results"]}
        missing = [f"{m} w{w} lr {lr:g} seed {s}" for (m, w, lr, s) in job_keys(settings)
                   if (m, w, lr, s) not in done]
        path = write_report(state, out, missing, args.note)
        print(f"wrote {path} from {len(state['results'])} runs; missing: {len(missing)}")
        return state["results"]

    if args.layers:
        return layers_study(out, argv)

    preset = "smoke" if args.smoke else "default"
    settings = PRESETS[preset]
    for field, value in (("seeds", tuple(range(args.seeds)) if args.seeds else None), ("steps", args.steps),
                         ("workers", args.workers), ("widths", tuple(args.widths) if args.widths else None),
                         ("fused_pairs", False if args.two_token_pairs else None)):
        if value is not None:
            settings = replace(settings, **{field: value})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scratch = out / ".recall_study_scratch"
    scratch.mkdir(exist_ok=True)
    params = {f"{m}@{w}": parameter_count(harness.init_model(model_config(settings, w, m), 0))
              for w in settings.widths for m in harness.MODELS}
    for w in settings.widths:
        counts = [params[f"{m}@{w}"] for m in harness.MODELS]
        assert max(counts) / min(counts) - 1 <= 0.02, f"parameters differ by more than 2% at width {w}: {counts}"
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in params.items()))
    started = time.time()
    state = {"settings": asdict(settings), "parameters": params, "preset": preset,
             "command": command(MODULE, sys.argv[1:] if argv is None else argv), "machine": harness.machine_line(),
             "started": started, "load_samples": [], "note": args.note}
    jobs = [{"model": m, "width": w, "learning_rate": lr, "seed": s, "settings": asdict(settings),
             "scratch": str(scratch / f"{m}-{w}-{lr:g}-{s}")} for (m, w, lr, s) in job_keys(settings)]
    results = harness.run_jobs(run_job, jobs, settings.workers, len(jobs) * settings.steps,
                               out / "recall_study.partial.json", state)
    state = harness.finished_state(state, results, started)
    path = write_report(state, out)
    (out / "recall_study.partial.json").unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"wrote {path} in {state['wall_seconds'] / 60:.1f} min")
    return results


def layers_study(out: Path, argv=None) -> list[dict]:
    """`--layers`: re-train every model at its best rate (each seed) and measure every layer's attention shares."""
    state = json.loads((out / "recall_study.json").read_text())
    settings = harness.settings_from_dict(Settings, state["settings"])
    results = state["results"]
    jobs = [{"model": m, "width": w, "learning_rate": best_rate(results, m, w), "seed": s,
             "settings": asdict(settings), "scratch": str(out / ".recall_study_scratch" / f"{m}-{w}-{s}")}
            for w in sorted({r["width"] for r in results}) for m in harness.MODELS for s in settings.seeds]
    started = time.time()
    layers = {"command": command(MODULE, sys.argv[1:] if argv is None else argv), "started": started,
              "load_samples": []}
    reruns = harness.run_jobs(run_job, jobs, settings.workers, len(jobs) * settings.steps,
                              out / "recall_study_layers.partial.json", layers)
    for run in reruns:
        original = runs_of(results, run["model"], run["width"], run["learning_rate"])
        original = next(r for r in original if r["seed"] == run["seed"])
        run["acc_difference_to_study"] = max(abs(run["acc"][c] - original["acc"][c]) for c in run["acc"])
        del run["curve"], run["train_loss_curve"]
    layers = {k: v for k, v in layers.items() if not k.startswith("_") and k != "started"}
    layers.update(runs=reruns, wall_seconds=time.time() - started)
    (out / "recall_study_layers.json").write_text(json.dumps(layers, indent=1))
    (out / "recall_study_layers.partial.json").unlink(missing_ok=True)
    shutil.rmtree(out / ".recall_study_scratch", ignore_errors=True)
    path = write_report(state, out)
    print(f"wrote {out / 'recall_study_layers.json'} and re-rendered {path} in {layers['wall_seconds'] / 60:.1f} min")
    return reruns


def job_keys(settings: Settings) -> list[tuple]:
    """(model, width, learning rate, seed) of every run, larger widths and slower models first (better packing)."""
    return [(m, w, lr, s) for w in sorted(settings.widths, reverse=True) for s in settings.seeds
            for lr in settings.learning_rates for m in ("diff-v2", "diff-v1", "llama")]


if __name__ == "__main__":
    main()
