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
PNG charts into ``--out`` (default ``benchmarks/results/paper_effects``). Settings: ``config.py`` beside this file.

    python -m benchmarks.studies.text.paper_effects            # the default study: 9 runs of 700 steps, ~33 min
    python -m benchmarks.studies.text.paper_effects --smoke    # a few steps, for the tests
    python -m benchmarks.studies.text.paper_effects --scale    # a larger study, for a GPU
    python -m benchmarks.studies.text.paper_effects --lr-sweep 5e-4 1.5e-3 4.5e-3 \\
        --reuse benchmarks/results/paper_effects/paper_effects.json   # Llama vs V1, each at its best rate

Training jobs run in ``--workers`` processes of one thread each, which on a small shared CPU is faster than one
process with two threads.
"""

import argparse
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.harness.report import add_run_arguments, command
from benchmarks.studies import harness
from benchmarks.studies.text.config import PRESETS, Settings
from benchmarks.studies.text.report import write_report, write_sweep_report
from benchmarks.studies.text.runs import prepare, reusable_runs, run_job

MODULE = "benchmarks.studies.text.paper_effects"


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
    parser.add_argument("--models", nargs="+", choices=harness.MODELS, default=None,
                        help="models to train (default: all three; with --lr-sweep: llama diff-v1)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a finished study's JSON (e.g. benchmarks/results/paper_effects/paper_effects.json): its "
                             "runs with the same settings (any learning rate) are taken instead of retrained, and the "
                             "report names them")
    parser.add_argument("--report-only", action="store_true",
                        help="do not train: write the report from the runs finished so far by an interrupted study "
                             "(OUT/paper_effects.partial.json), saying which runs are missing")
    parser.add_argument("--note", default="",
                        help="with --report-only: one line of context added to the report (e.g. the machine load "
                             "observed during a run that did not record it)")
    add_run_arguments(parser, "paper_effects")
    return parser.parse_args(argv)


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

    tokenizer_file, params = prepare(settings, scratch)
    state = {"settings": asdict(settings), "parameters": params, "preset": preset,
             "command": command(MODULE, sys.argv[1:] if argv is None else argv), "machine": harness.machine_line(),
             "started": started, "load_samples": []}
    if args.lr_sweep:
        return lr_sweep(args, settings, state, tokenizer_file, scratch, out)
    models = args.models or harness.MODELS
    jobs = [{"model": m, "seed": s, "settings": asdict(settings), "tokenizer_file": tokenizer_file,
             "scratch": str(scratch / f"{m}-{s}")} for s in settings.seeds for m in models]
    results = harness.run_jobs(run_job, jobs, settings.workers, len(jobs) * settings.steps,
                               out / "paper_effects.partial.json", state)
    wall = time.time() - started
    (out / "paper_effects.partial.json").unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)  # the tokenizer file and the Trainer's empty output folders
    verdicts = write_report(results, settings, params, wall, out, "paper_effects", preset, state["command"],
                            load_samples=state["load_samples"], machine=state["machine"])
    for v in verdicts:
        print(f"{v['metric']}: best {v['best']}{'' if v['clear'] else ' (within spread)'}")
    print(f"wrote {out / 'paper_effects.md'} in {wall / 60:.1f} min")
    return results


def lr_sweep(args, settings: Settings, state: dict, tokenizer_file: str, scratch: Path, out: Path) -> list[dict]:
    """Train `args.models` (default Llama and V1) at every rate of `args.lr_sweep` and seed; write the sweep report.

    Runs found in `args.reuse` with the same settings apart from the learning rate are taken, not retrained.
    """
    models = args.models or ("llama", "diff-v1")
    reused = reusable_runs(args.reuse, settings, models, args.lr_sweep) if args.reuse else []
    done = {(r["model"], r["seed"], round(r["learning_rate"], 12)) for r in reused}
    jobs = [{"model": m, "seed": s, "settings": asdict(replace(settings, learning_rate=lr)),
             "tokenizer_file": tokenizer_file, "scratch": str(scratch / f"{m}-{s}-{lr:g}")}
            for lr in args.lr_sweep for s in settings.seeds for m in models if (m, s, round(lr, 12)) not in done]
    state.update(learning_rates=list(args.lr_sweep), models=list(models), reused=len(reused))
    print(f"{len(jobs)} runs to train, {len(reused)} reused from {args.reuse}")
    results = reused + harness.run_jobs(run_job, jobs, settings.workers, len(jobs) * settings.steps,
                                        out / "paper_effects_lr_sweep.partial.json", state)
    write_sweep_report(harness.finished_state(state, results, state["started"]), out)
    (out / "paper_effects_lr_sweep.partial.json").unlink(missing_ok=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return results


def report_from_partial(out: Path, note: str = ""):
    """Re-write the report from saved measurements, without training: from OUT/paper_effects.partial.json (an
    interrupted study) or else from OUT/paper_effects.json (a finished one)."""
    import json

    partial = out / "paper_effects.partial.json"
    saved = partial if partial.exists() else out / "paper_effects.json"
    state = json.loads(saved.read_text())
    settings = harness.settings_from_dict(Settings, state["settings"])
    preset = state.get("preset") or next((name for name, p in PRESETS.items() if asdict(p) == asdict(settings)),
                                         "custom")
    results = state["results"]
    finished = {(r["model"], r["seed"]) for r in results}
    missing = [f"{m} seed {s}" for s in settings.seeds for m in harness.MODELS if (m, s) not in finished]
    wall = state.get("elapsed_seconds", state.get("wall_seconds"))
    write_report(results, settings, state["parameters"], wall, out, "paper_effects", preset,
                 state.get("command") or f"python -m {MODULE}", missing, rendered_from=saved.name,
                 load_samples=state.get("load_samples"), note=note or state.get("note", ""),
                 machine=state.get("machine"))
    print(f"wrote {out / 'paper_effects.md'} from {len(results)} finished runs; missing: {', '.join(missing) or '-'}")


if __name__ == "__main__":
    main()
