"""One run of the recall study's job (one model, width, learning rate, seed 0): how the task was sized.

The recall study trains 27 runs; before fixing its defaults, single runs like this one showed whether any model
learns the task within the CPU budget at all (the study asks for ≥ 90% accuracy in the easiest cell). It prints the
commit and machine it ran on, the final accuracy per cell, the steps to 90%, the training curve of the easiest and
hardest cells and the last-layer attention shares. Results of the sizing trials:
``benchmarks/results/recall_study/calibration.md``.

    python -m benchmarks.studies.recall.recall_trial diff-v1 64 3e-3 2000 \
        --set '{"pairs": [2, 6, 12], "context_lens": [16, 48]}'
"""

import argparse
import json
import time
from dataclasses import asdict, replace

from benchmarks.harness.report import machine_info
from benchmarks.harness.study import MODELS
from benchmarks.studies.recall.config import Settings
from benchmarks.studies.recall.recall_study import run_job
from benchmarks.studies.recall.task import cell_name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=MODELS, help="which model to train")
    parser.add_argument("width", type=int, help="hidden size")
    parser.add_argument("learning_rate", type=float, help="peak learning rate")
    parser.add_argument("steps", type=int, help="training steps")
    parser.add_argument("--set", default="{}",
                        help="JSON object of recall Settings fields to change (benchmarks/studies/recall/config.py), "
                             "e.g. '{\"fused_pairs\": false, \"queries\": 16}'")
    args = parser.parse_args(argv)
    changes = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.set).items()}
    settings = replace(Settings(), steps=args.steps, eval_samples=64, threads_per_worker=1, **changes)
    info = machine_info(1)
    print(f"commit {info['commit']}, {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']}, "
          f"transformers {info['transformers']}, {info['date_utc']}, load average {info['load_start'][0]:.2f}")
    started = time.time()
    run = run_job({"model": args.model, "width": args.width, "learning_rate": args.learning_rate, "seed": 0,
                   "settings": asdict(settings), "scratch": "/tmp/recall_trial"})
    easy, hard = cell_name(settings.cells[0]), cell_name(settings.cells[-1])
    print(f"{args.model} width {args.width} lr {args.learning_rate:g} {args.steps} steps {args.set}: "
          f"{run['parameters']:,} parameters, {time.time() - started:.0f} s")
    print("accuracy: " + ", ".join(f"{cell} {acc:.3f}" for cell, acc in run["acc"].items()))
    print("steps to 90%: " + ", ".join(f"{cell} {steps}" for cell, steps in run["steps_to_90"].items()))
    print(f"curve (step, {easy}, {hard}): " + " ".join(f"({p['step']}, {p['acc'][easy]:.2f}, {p['acc'][hard]:.2f})"
                                                      for p in run["curve"]))
    print(f"last-layer attention shares, {hard}: {run['attention'][hard]['mean']}")
    return run


if __name__ == "__main__":
    main()
